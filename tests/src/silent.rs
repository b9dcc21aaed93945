//! Hostile clients for the limits tests: many connections that open and
//! then say nothing, or too little (a ClientHello fragment, a TLS session
//! with no HTTP/2, an HTTP/2 HEADERS frame never finished), held by the test
//! process so it can watch the agent close them.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// What a connection sends before it goes quiet.
#[derive(Clone)]
pub enum Opening {
    /// Nothing at all.
    Nothing,
    /// These bytes (e.g. the start of a TLS record).
    Bytes(Vec<u8>),
    /// A complete TLS handshake with this client config, then nothing.
    Tls(Arc<rustls::ClientConfig>),
    /// TLS, then the HTTP/2 preface, SETTINGS and a HEADERS frame without
    /// END_HEADERS (its CONTINUATION never comes).
    TlsHttp2PartialHeaders(Arc<rustls::ClientConfig>),
}

/// The first bytes of a TLS ClientHello record that announces 512 bytes.
pub const CLIENT_HELLO_FRAGMENT: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00];

/// The HTTP/2 preface, an empty SETTINGS frame and a one-byte HEADERS frame
/// on stream 1 without END_HEADERS.
pub const HTTP2_PARTIAL_HEADERS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
    \x00\x00\x00\x04\x00\x00\x00\x00\x00\
    \x00\x00\x01\x01\x00\x00\x00\x00\x01\x82";

/// Opens `count` connections to `to` from inside network namespace
/// `netns`, each sending `opening`; they stay open until dropped.
pub fn open(
    netns: &Path,
    to: SocketAddr,
    count: usize,
    opening: &Opening,
) -> anyhow::Result<Vec<TcpStream>> {
    let opening = opening.clone();
    in_netns(netns, move || {
        (0..count)
            .map(|n| {
                let mut stream =
                    connect_retrying(to).with_context(|| format!("connection {n} to {to}"))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                begin(&mut stream, to, &opening).with_context(|| format!("connection {n}"))?;
                Ok(stream)
            })
            .collect()
    })
}

/// Connects, trying again (from another port) when the connect is refused
/// or reset: among a thousand connections opened in a burst, now and then
/// one is refused at its SYN (seen about once in three runs of the limits
/// test, at the 360th connection to a captured port; the cause is not
/// known yet). The flood is about what the agent does with silent
/// connections; a retry is printed, so it stays visible.
fn connect_retrying(to: SocketAddr) -> std::io::Result<TcpStream> {
    let mut attempt = 1;
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Err(error)
                if attempt < 3
                    && matches!(
                        error.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
            {
                eprintln!("silent: connect to {to} failed ({error}); trying again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Runs `work` on a thread inside network namespace `netns` (the sockets
/// it makes stay in that namespace).
fn in_netns<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let netns = std::fs::File::open(netns).with_context(|| netns.display().to_string())?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        // SAFETY: only this thread enters the namespace.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        work()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in the namespace panicked"))?
}

fn begin(stream: &mut TcpStream, to: SocketAddr, opening: &Opening) -> anyhow::Result<()> {
    match opening {
        Opening::Nothing => Ok(()),
        Opening::Bytes(bytes) => Ok(stream.write_all(bytes)?),
        Opening::Tls(config) => tls(stream, to, config, &[]),
        Opening::TlsHttp2PartialHeaders(config) => tls(stream, to, config, HTTP2_PARTIAL_HEADERS),
    }
}

/// A TLS handshake on `stream`, then `then` written through the session;
/// the session state is dropped (nothing more is ever sent).
fn tls(
    stream: &mut TcpStream,
    to: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    then: &[u8],
) -> anyhow::Result<()> {
    let name = weir_agent::security::tls::peer_name(to.ip());
    let mut session = rustls::ClientConnection::new(config.clone(), name)?;
    while session.is_handshaking() {
        session.complete_io(stream).context("TLS handshake")?;
    }
    if !then.is_empty() {
        session.writer().write_all(then)?;
        while session.wants_write() {
            session.write_tls(stream)?;
        }
    }
    Ok(())
}

/// From inside `netns`: a connection to `first` from a fresh port, closed
/// once the other side closes it, then a connection to `second` from the
/// same address and port; returns the second.
pub fn reuse_source_port(
    netns: &Path,
    first: SocketAddr,
    second: SocketAddr,
) -> anyhow::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    in_netns(netns, move || {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.connect_timeout(&first.into(), Duration::from_secs(5))?;
        let source = socket
            .local_addr()?
            .as_socket()
            .context("the first connection's address")?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buffer = [0u8; 64];
        let closed = matches!(stream.read(&mut buffer), Ok(0) | Err(_));
        anyhow::ensure!(closed, "{first} did not close the connection");
        drop(stream);
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&source.into())?;
        socket.connect_timeout(&second.into(), Duration::from_secs(5))?;
        Ok(socket.into())
    })
}

/// How many of `streams` the other side has closed (EOF or reset); what
/// it sent meanwhile is read and dropped.
pub fn closed(streams: &[TcpStream]) -> usize {
    streams.iter().filter(|stream| is_closed(stream)).count()
}

fn is_closed(mut stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// The number of descriptors process `pid` has open.
pub fn open_descriptors(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .context("/proc/<pid>/stat")?;
    let ticks = |index: usize| -> anyhow::Result<u64> {
        Ok(fields.get(index).context("stat field")?.parse()?)
    };
    // utime and stime are fields 14 and 15 (11 and 12 after the command).
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Ok(Duration::from_millis(total * 1000 / per_second.max(1)))
}
