//! Relays bytes between two TCP sockets, bulk with `splice(2)` through a
//! pipe, so it never crosses into the agent's memory: the relay of the
//! same-node hand-off, of plaintext L4 and of plaintext inbound delivery.
//!
//! A direction starts by copying, as [`super::relay`] does, and turns to
//! splicing once one read fills a whole copy buffer (bulk). Like the copy
//! buffers, a direction holds its pipe only while bytes are
//! in it: it takes one from a small per-thread pool after its socket turns
//! readable and gives it back empty, so an idle connection holds no pipe.
//! Bytes are counted into the client's meters as they move, and each move
//! marks the connection active for the idle timeout.
//!
//! Written here rather than taken from a crate (`tokio-splice`): the relay
//! must count bytes as they flow, report them when it fails, keep idle
//! connections free of pipes and half-close each direction at its EOF.
use std::{
    cell::RefCell,
    io,
    net::Shutdown,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{io::Interest, net::TcpStream};

use super::{
    idle::Activity,
    relay::{self, Copied},
};
use crate::telemetry::connection::ByteMeter;

/// Bytes asked for per splice from a socket: what a pipe of
/// [`PIPE_BYTES`] holds.
const CHUNK: usize = PIPE_BYTES;

/// A pipe's capacity (`F_SETPIPE_SZ`); Linux's default is 64 KiB (16
/// slots), and a socket's data often comes in fragments smaller than a
/// page, each taking a slot.
const PIPE_BYTES: usize = 256 * 1024;

/// Pipes kept per worker thread between uses, as for copy buffers.
const POOLED_PER_THREAD: usize = 16;

/// An empty pipe: (read end, write end).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe carries more per splice; if the system's limit
        // (`/proc/sys/fs/pipe-max-size`) refuses it, the default will do.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        Ok(Pipe { read, write })
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

fn take_pipe() -> io::Result<Pipe> {
    match POOL.with(|pool| pool.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// `pipe` must be empty.
fn give_back(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOLED_PER_THREAD {
            pool.push(pipe);
        }
    });
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call; null offsets (sockets
    // and pipes have none).
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(moved).map_err(|_| io::Error::last_os_error())
}

/// Who counts one direction's bytes: the client's meters, and the
/// connection's activity.
struct Tally<'a> {
    /// Bytes written to the other socket.
    moved: &'a AtomicU64,
    /// The client's meters, and whether this direction reads from the
    /// client (sent) or writes to it (received).
    meters: &'a [Arc<ByteMeter>],
    from_client: bool,
    activity: Option<&'a Activity>,
}

impl Tally<'_> {
    fn read(&self, bytes: usize) {
        if self.from_client {
            for meter in self.meters {
                meter.add_sent(bytes as u64);
            }
        }
        if let Some(activity) = self.activity {
            activity.touch();
        }
    }

    fn written(&self, bytes: usize) {
        self.moved.fetch_add(bytes as u64, Ordering::Relaxed);
        if !self.from_client {
            for meter in self.meters {
                meter.add_received(bytes as u64);
            }
        }
        if let Some(activity) = self.activity {
            activity.touch();
        }
    }
}

/// Moves `from`'s bytes to `to` until `from`'s EOF, then half-closes `to`.
/// A direction copies until one read fills a whole copy buffer: small
/// messages (requests, replies) cost less copied than spliced, and a
/// direction that fills a buffer is carrying bulk, spliced from then on.
async fn one_way(from: &TcpStream, to: &TcpStream, tally: Tally<'_>) -> io::Result<()> {
    loop {
        from.readable().await?;
        match copy_once(from, to, &tally).await? {
            Some(0) => return socket2::SockRef::from(to).shutdown(Shutdown::Write),
            Some(relay::BUFFER_BYTES) => break,
            _ => {}
        }
    }
    loop {
        from.readable().await?;
        let pipe = take_pipe()?;
        let read = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
        });
        let mut in_pipe = match read {
            Ok(0) => {
                give_back(pipe);
                return socket2::SockRef::from(to).shutdown(Shutdown::Write);
            }
            Ok(read) => read,
            Err(error) => {
                give_back(pipe);
                if error.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(error);
            }
        };
        tally.read(in_pipe);
        while in_pipe > 0 {
            // On an error the pipe, maybe not empty, is dropped.
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe)
            }) {
                Ok(written) => {
                    in_pipe -= written;
                    tally.written(written);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        give_back(pipe);
    }
}

/// One read from `from` (readable) through a pooled copy buffer, written
/// whole to `to`: the bytes read (0 at EOF, [`relay::BUFFER_BYTES`] when
/// the read filled the buffer), `None` when readiness was stale.
async fn copy_once(
    from: &TcpStream,
    to: &TcpStream,
    tally: &Tally<'_>,
) -> io::Result<Option<usize>> {
    let mut buffer = relay::take_buffer();
    let read = match from.try_read(&mut buffer) {
        Ok(read) => read,
        Err(error) => {
            relay::give_back(buffer);
            return if error.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(error)
            };
        }
    };
    tally.read(read);
    let mut start = 0;
    while start < read {
        to.writable().await?;
        match to.try_write(&buffer[start..read]) {
            Ok(written) => {
                start += written;
                tally.written(written);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    relay::give_back(buffer);
    Ok(Some(read))
}

/// Relays `client` and `server` both ways until both directions reached
/// EOF (each half-closing the other socket) or one failed; `meters` count
/// the client's bytes, `activity` marks each move.
pub async fn splice_both_ways(
    client: &TcpStream,
    server: &TcpStream,
    meters: &[Arc<ByteMeter>],
    activity: Option<&Activity>,
) -> Copied {
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let there = one_way(
        client,
        server,
        Tally {
            moved: &sent,
            meters,
            from_client: true,
            activity,
        },
    );
    let back = one_way(
        server,
        client,
        Tally {
            moved: &received,
            meters,
            from_client: false,
            activity,
        },
    );
    let result = tokio::try_join!(there, back);
    Copied {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        error: result.err(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets: (near, far).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (near, far) = tokio::join!(TcpStream::connect(address), listener.accept());
        (near.expect("connect"), far.expect("accept").0)
    }

    #[tokio::test]
    async fn splices_both_ways_counts_and_half_closes() {
        let (mut client, client_end) = pair().await;
        let (server_end, mut server) = pair().await;
        let meters = [
            Arc::new(ByteMeter::default()),
            Arc::new(ByteMeter::default()),
        ];
        let activity = Activity::new();
        let relay = {
            let meters = meters.clone();
            let activity = activity.clone();
            tokio::spawn(async move {
                splice_both_ways(&client_end, &server_end, &meters, Some(&activity)).await
            })
        };
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await?;
            client.shutdown().await?;
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await?;
            io::Result::Ok(reply)
        });
        let mut arrived = Vec::new();
        server.read_to_end(&mut arrived).await.expect("read");
        assert!(arrived == payload, "the bytes arrived in order");
        server.write_all(b"reply").await.expect("write");
        server.shutdown().await.expect("shutdown");
        let reply = writer.await.expect("join").expect("client");
        assert_eq!(reply, b"reply");
        let copied = relay.await.expect("join");
        assert_eq!((copied.sent, copied.received), (3_000_000, 5));
        assert!(copied.error.is_none());
        for meter in &meters {
            assert_eq!(meter.totals(), (3_000_000, 5));
        }
        // Every pipe went back to a pool empty; none is held.
    }

    /// A reset from one side ends the relay with an error and the bytes
    /// moved until then.
    #[tokio::test]
    async fn a_reset_ends_it_with_the_counts() {
        let (mut client, client_end) = pair().await;
        let (server_end, server) = pair().await;
        let relay =
            tokio::spawn(
                async move { splice_both_ways(&client_end, &server_end, &[], None).await },
            );
        client.write_all(b"hello").await.expect("write");
        let mut server = server;
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.expect("read");
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(server);
        // The relay sees the reset on its server socket: reading it, or
        // writing these bytes to it.
        client.write_all(b"more").await.expect("write");
        let copied = tokio::time::timeout(std::time::Duration::from_secs(10), relay)
            .await
            .expect("the relay ended")
            .expect("join");
        assert!(copied.sent >= 5);
        assert!(copied.error.is_some());
    }
}
