//! A tonic server for tests, on its own thread and runtime inside a
//! network namespace (a test node's), listening on 127.0.0.1 at a free port;
//! stopped and joined when dropped.
use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use tonic::transport::{Server, server::Router};

pub struct GrpcServer {
    pub address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcServer {
    /// Starts the router `make` builds from a fresh `Server::builder()`
    /// (TLS and services are its business); `what` names it in errors.
    pub fn start<F>(netns: &Path, what: &'static str, make: F) -> anyhow::Result<GrpcServer>
    where
        F: FnOnce(Server) -> anyhow::Result<Router> + Send + 'static,
    {
        let netns =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let (address_tx, address_rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let run = || -> anyhow::Result<()> {
                use std::os::fd::AsRawFd as _;
                // SAFETY: only this thread (and the runtime it builds) enters.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let _ = address_tx.send(Ok(listener.local_addr()?));
                    make(Server::builder())?
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::TcpListenerStream::new(listener),
                            async {
                                let _ = shutdown_rx.await;
                            },
                        )
                        .await?;
                    Ok(())
                })
            };
            if let Err(error) = run() {
                eprintln!("{what}: {error:#}");
            }
        });
        let address = address_rx
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("{what} did not start"))??;
        Ok(GrpcServer {
            address,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
