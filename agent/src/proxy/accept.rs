//! Accepting, as every listener of the agent does it (the proxy's 15001,
//! 15006 and 15008 and the admin ports): an error that says the process is
//! out of something (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses the listener,
//! 10 ms doubling to 1 s while it lasts, instead of retrying at once (the
//! pending connection stays queued, so an immediate retry fails again and
//! spins a core); it is counted and logged once per burst. A client that
//! went away before it was accepted is skipped.
use std::{io::ErrorKind, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use super::limits::{Limits, Listener};

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// One listener's accepting, with its pause after failures.
pub struct Acceptor<'a> {
    listener: &'a TcpListener,
    kind: Listener,
    limits: &'a Limits,
    pause: Duration,
}

impl<'a> Acceptor<'a> {
    pub fn new(listener: &'a TcpListener, kind: Listener, limits: &'a Limits) -> Acceptor<'a> {
        Acceptor {
            listener,
            kind,
            limits,
            pause: Duration::ZERO,
        }
    }

    /// The next connection; failures are paused over, counted and logged.
    pub async fn next(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.pause = Duration::ZERO;
                    return accepted;
                }
                // That client is gone; the next one may be fine.
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    self.pause = next_pause(self.pause);
                    self.limits.accept_failed(self.kind, &error, self.pause);
                    tokio::time::sleep(self.pause).await;
                }
            }
        }
    }
}

fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionRefused
            | ErrorKind::Interrupted
    )
}

fn next_pause(pause: Duration) -> Duration {
    if pause.is_zero() {
        FIRST_PAUSE
    } else {
        (pause * 2).min(MAX_PAUSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_a_second() {
        let mut pause = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..10 {
            pause = next_pause(pause);
            seen.push(pause.as_millis());
        }
        assert_eq!(
            seen,
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000],
            "{seen:?}"
        );
    }

    #[test]
    fn out_of_descriptors_is_not_a_connection_error() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(!is_connection_error(&emfile));
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert!(is_connection_error(&aborted));
    }
}
