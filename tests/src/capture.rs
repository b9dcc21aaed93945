//! Packet capture on a node's interface (AF_PACKET, from inside the node's
//! namespace), to check what crosses the wire.
use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};

/// Captures every frame on `interface` of network namespace `netns` until
/// stopped; `finish` returns the bytes of all frames concatenated.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<u8>>>,
}

impl Capture {
    pub fn start(netns: &Path, interface: &str) -> anyhow::Result<Capture> {
        let netns = File::open(netns).with_context(|| format!("{}", netns.display()))?;
        let interface = std::ffi::CString::new(interface)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<u8>> {
            // SAFETY: this thread alone enters the namespace.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let protocol = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket(2); the fd is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh, owned descriptor.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: if_nametoindex reads a valid C string.
            let index = unsafe { libc::if_nametoindex(interface.as_ptr()) };
            if index == 0 {
                bail!("no interface {interface:?}");
            }
            // SAFETY: zeroed sockaddr_ll is valid; fields set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol as u16;
            addr.sll_ifindex = index as i32;
            // SAFETY: bind with a properly sized sockaddr_ll.
            let rc = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                bail!("bind: {}", std::io::Error::last_os_error());
            }
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: SO_RCVTIMEO with a timeval.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as u32,
                )
            };
            let _ = ready_tx.send(());
            let mut captured = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: reading into a buffer we own.
                let n = unsafe {
                    libc::recv(
                        socket.as_raw_fd(),
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        0,
                    )
                };
                if n > 0 {
                    captured.extend_from_slice(&frame[..n as usize]);
                }
            }
            Ok(captured)
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .context("capture did not start")?;
        Ok(Capture { stop, thread })
    }

    pub fn finish(self) -> anyhow::Result<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))?
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}
