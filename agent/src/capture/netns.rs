//! Network namespaces: running a closure inside a pod's namespace (to create
//! sockets there, talk netlink there) and coming back.
//!
//! A socket belongs to the namespace it was created in for its whole life, so
//! the proxy only needs to be "inside" a pod for the `socket()` call; this is
//! ztunnel's in-pod approach. `setns` affects the calling thread only.
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open handle on a network namespace (keeps it alive while open).
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    pub fn open(path: &Path) -> Result<NetNs, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(NetNs {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The calling thread's namespace (the node's, for the agent).
    pub fn current() -> Result<NetNs, NetnsError> {
        NetNs::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn enter(&self) -> Result<(), NetnsError> {
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(self.file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(NetnsError::Enter {
                path: self.path.clone(),
                source: std::io::Error::last_os_error(),
            })
        }
    }

    /// Runs `f` with the calling thread inside this namespace, then returns
    /// the thread to `home`. On an async thread, `f` must not block.
    pub fn run<T>(&self, home: &NetNs, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        self.enter()?;
        let result = f();
        if let Err(error) = home.enter() {
            // A worker thread stuck in a pod's namespace would open the
            // agent's later sockets there: unrecoverable, stop now.
            tracing::error!(%error, "cannot return to the node network namespace; exiting");
            std::process::exit(70);
        }
        Ok(result)
    }
}

/// The cookie of the calling thread's namespace, as `bpf_get_netns_cookie`
/// returns it.
pub fn current_cookie() -> std::io::Result<u64> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_NETNS_COOKIE writes a u64 into the buffer we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
