//! `podtool`: the workload run inside test pods. Plain blocking sockets on
//! purpose: it is the "ordinary application" the mesh must not disturb.
//!
//! serve --port P [--bind IP] [--mode echo|sink]   one JSON line per connection
//! send --to ADDR --bytes N [--dstopts] N pseudo-random bytes, reads the echo; reports
//!                                     getsockname (`local`), the kernel's own local
//!                                     address (`kernel_local`) and getpeername (`peer`);
//!                                     `--dstopts`: every IPv6 packet, the SYN first,
//!                                     carries a Destination Options header
//! probe --to ADDR --interval-ms I     a small exchange every I ms, forever (same fields)
//! pingpong --to ADDR --count N        1-byte round trips; latency percentiles
//! bulk --to ADDR --bytes N            one-way throughput against a sink
//! stream --to ADDR --seconds S        one connection, an exchange every 100 ms
//! connrate --to ADDR --seconds S      new connections per second (1-byte echo each)
//! hold --to ADDR --count N            open N idle connections, report, wait to be killed
//! burst --to ADDR --count N           N connections opened at the same instant, 1 KiB echo each
//! reset --to ADDR --bytes N          N pattern bytes, their echo read back, then the
//!                                     connection reset (RST: SO_LINGER 0 and close)
//! dns --to ADDR --name N [--type a|aaaa]  one DNS query from an unconnected UDP
//!                                     socket (sendto/recvfrom); reports the reply's
//!                                     source (`from`), `rcode` and `addresses`
//! raw --to ADDR --data TEXT [--wait-ms W]  writes TEXT (\r, \n, \\ and \xNN escapes), reads
//!                                     until the peer closes (or W ms, default 5000); reports
//!                                     what came back
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn required(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| {
        eprintln!("podtool: missing {name}");
        std::process::exit(2)
    })
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        eprintln!("podtool: bad address {text}");
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(
            arg(&args, "--bind").unwrap_or_else(|| "0.0.0.0".into()),
            required(&args, "--port").parse().unwrap_or(8080),
            arg(&args, "--mode").unwrap_or_else(|| "echo".into()),
        ),
        Some("send") => send(
            addr(&required(&args, "--to")),
            required(&args, "--bytes").parse().unwrap_or(0),
            args.iter().any(|arg| arg == "--dstopts"),
        ),
        Some("probe") => probe(
            addr(&required(&args, "--to")),
            required(&args, "--interval-ms").parse().unwrap_or(100),
        ),
        Some("pingpong") => pingpong(
            addr(&required(&args, "--to")),
            required(&args, "--count").parse().unwrap_or(1000),
        ),
        Some("stream") => stream(
            addr(&required(&args, "--to")),
            required(&args, "--seconds").parse().unwrap_or(10),
        ),
        Some("connrate") => connrate(
            addr(&required(&args, "--to")),
            required(&args, "--seconds").parse().unwrap_or(3),
        ),
        Some("burst") => burst(
            addr(&required(&args, "--to")),
            required(&args, "--count").parse().unwrap_or(8),
        ),
        Some("hold") => hold(
            addr(&required(&args, "--to")),
            required(&args, "--count").parse().unwrap_or(100),
            arg(&args, "--bytes")
                .and_then(|bytes| bytes.parse().ok())
                .unwrap_or(1),
        ),
        Some("raw") => raw(
            addr(&required(&args, "--to")),
            unescape(&required(&args, "--data")),
            arg(&args, "--wait-ms")
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(5000),
        ),
        Some("reset") => reset(
            addr(&required(&args, "--to")),
            required(&args, "--bytes").parse().unwrap_or(0),
        ),
        Some("dns") => dns(
            addr(&required(&args, "--to")),
            required(&args, "--name"),
            arg(&args, "--type").as_deref() == Some("aaaa"),
        ),
        Some("bulk") => bulk(
            addr(&required(&args, "--to")),
            required(&args, "--bytes").parse().unwrap_or(0),
        ),
        _ => {
            eprintln!("usage: podtool serve|send|probe|pingpong|bulk ...");
            std::process::exit(2);
        }
    }
}

/// A DNS query written by hand (RFC 1035 4.1), sent with `sendto` on an
/// unconnected socket, as some resolvers (musl's, Go's fallback) do.
fn dns(to: SocketAddr, name: String, aaaa: bool) {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap_or(to)
    } else {
        "[::]:0".parse().unwrap_or(to)
    };
    let fail = |what: &str, error: std::io::Error| -> ! {
        print_line(serde_json::json!({"error": format!("{what}: {error}")}));
        std::process::exit(1)
    };
    let socket = std::net::UdpSocket::bind(bind).unwrap_or_else(|e| fail("bind", e));
    let _ = socket.set_read_timeout(Some(Duration::from_secs(5)));
    let id: u16 = 0x5eed;
    // Header: id, RD, one question.
    let mut query = Vec::new();
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    let record_type: u16 = if aaaa { 28 } else { 1 };
    query.push(0);
    query.extend_from_slice(&record_type.to_be_bytes());
    query.extend_from_slice(&1u16.to_be_bytes());
    socket
        .send_to(&query, to)
        .unwrap_or_else(|e| fail("sendto", e));
    let mut reply = [0u8; 4096];
    let (size, from) = socket
        .recv_from(&mut reply)
        .unwrap_or_else(|e| fail("recvfrom", e));
    let reply = &reply[..size];
    let u16_at = |at: usize| {
        reply
            .get(at..at + 2)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
    };
    // A name: labels up to a zero, or a compression pointer (two bytes).
    let skip_name = |mut at: usize| {
        while let Some(&length) = reply.get(at) {
            if length & 0xc0 == 0xc0 {
                return at + 2;
            }
            at += 1 + usize::from(length);
            if length == 0 {
                return at;
            }
        }
        at
    };
    let mut addresses = Vec::new();
    let mut at = skip_name(12) + 4;
    for _ in 0..u16_at(6) {
        at = skip_name(at);
        let (kind, length) = (u16_at(at), usize::from(u16_at(at + 8)));
        let data = reply.get(at + 10..at + 10 + length).unwrap_or_default();
        match (kind, data.len()) {
            (1, 4) => addresses
                .push(std::net::Ipv4Addr::new(data[0], data[1], data[2], data[3]).to_string()),
            (28, 16) => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(data);
                addresses.push(std::net::Ipv6Addr::from(octets).to_string());
            }
            _ => {}
        }
        at += 10 + length;
    }
    print_line(serde_json::json!({
        "from": from.to_string(),
        "id_matches": u16_at(0) == id,
        "rcode": u16_at(2) & 0xf,
        "addresses": addresses,
    }));
}

/// One hand-written request, for malformed input: what the other side
/// answered and whether it closed the connection.
/// `\r`, `\n`, `\\` and `\xNN` (a byte, for binary frames) in `text`.
fn unescape(text: &str) -> Vec<u8> {
    let input = text.as_bytes();
    let mut bytes = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let escaped = match (input[i], input.get(i + 1)) {
            (b'\\', Some(b'r')) => Some((b'\r', 2)),
            (b'\\', Some(b'n')) => Some((b'\n', 2)),
            (b'\\', Some(b'\\')) => Some((b'\\', 2)),
            (b'\\', Some(b'x')) => input
                .get(i + 2..i + 4)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .map(|byte| (byte, 4)),
            _ => None,
        };
        let (byte, width) = escaped.unwrap_or((input[i], 1));
        bytes.push(byte);
        i += width;
    }
    bytes
}

fn raw(to: SocketAddr, data: Vec<u8>, wait_ms: u64) {
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(stream) => stream,
        Err(error) => {
            print_line(serde_json::json!({"error": format!("connect: {error}")}));
            std::process::exit(1);
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(wait_ms)));
    if let Err(error) = stream.write_all(&data) {
        print_line(serde_json::json!({"error": format!("write: {error}")}));
        std::process::exit(1);
    }
    let started = Instant::now();
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buffer) {
            Ok(0) => break true,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            // Timed out with the connection still open, or reset.
            Err(error) => break error.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    let text = String::from_utf8_lossy(&response);
    print_line(serde_json::json!({
        "status_line": text.lines().next().unwrap_or_default(),
        "response": text,
        "closed": closed,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }));
}

/// An exchange, then a reset instead of an orderly close: the proxy sees
/// the connection end in an error after `bytes` each way.
fn reset(to: SocketAddr, bytes: usize) {
    use std::os::fd::AsRawFd as _;
    let result = (|| -> std::io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let data = pattern(bytes, 3);
        stream.write_all(&data)?;
        let mut echo = vec![0u8; bytes];
        stream.read_exact(&mut echo)?;
        if echo != data {
            return Err(std::io::Error::other("echo differs"));
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a linger struct of the size given.
        let set = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })();
    match result {
        Ok(()) => print_line(serde_json::json!({"ok": true, "bytes": bytes})),
        Err(error) => {
            print_line(serde_json::json!({"ok": false, "error": error.to_string()}));
            std::process::exit(1);
        }
    }
}

fn print_line(value: serde_json::Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{value}");
    let _ = stdout.flush();
}

fn serve(bind: String, port: u16, mode: String) {
    let listener = match TcpListener::bind((bind.as_str(), port)) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("podtool: bind {port}: {error}");
            std::process::exit(1)
        }
    };
    print_line(serde_json::json!({"event": "listening", "port": port}));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mode = mode.clone();
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let local = stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let bytes = match mode.as_str() {
                "sink" => sink_connection(stream),
                _ => echo_connection(stream),
            };
            print_line(serde_json::json!({"peer": peer, "local": local, "bytes": bytes}));
        });
    }
}

fn echo_connection(mut stream: TcpStream) -> u64 {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                if stream.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                eprintln!("podtool serve: read: {error}");
                break;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    total
}

/// Reads everything, then answers with the byte count (8 bytes, big-endian).
fn sink_connection(mut stream: TcpStream) -> u64 {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                eprintln!("podtool sink: read: {error}");
                break;
            }
        }
    }
    let _ = stream.write_all(&total.to_be_bytes());
    let _ = stream.shutdown(Shutdown::Write);
    total
}

use weir_tests::podtool::pattern;

/// The socket's local address as the kernel holds it, from
/// `/proc/self/net/tcp{,6}` (matched by the socket's inode): unlike
/// `getsockname`, no cgroup hook rewrites it, so a test can tell that a
/// connection was captured (bound to the proxy listener's loopback) even
/// though the application sees the pod's address.
fn kernel_local(stream: &TcpStream) -> String {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    let Ok(meta) = std::fs::metadata(format!("/proc/self/fd/{}", stream.as_raw_fd())) else {
        return String::new();
    };
    let inode = meta.ino().to_string();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(9) != Some(&inode.as_str()) {
                continue;
            }
            let Some((ip, port)) = fields.get(1).and_then(|local| local.split_once(':')) else {
                continue;
            };
            // Each 32-bit word is the network-order bytes printed as a
            // native-endian integer.
            let bytes: Vec<u8> = (0..ip.len() / 8)
                .filter_map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok())
                .flat_map(u32::to_ne_bytes)
                .collect();
            let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
                Ok(v4) => std::net::IpAddr::from(v4),
                Err(_) => match <[u8; 16]>::try_from(bytes.as_slice()) {
                    Ok(v6) => std::net::IpAddr::from(v6),
                    Err(_) => continue,
                },
            };
            let port = u16::from_str_radix(port, 16).unwrap_or_default();
            return SocketAddr::new(ip, port).to_string();
        }
    }
    String::new()
}

/// A connection to `to`; with `dstopts`, from an IPv6 socket whose packets
/// carry a Destination Options header (one PadN option): a SYN behind an
/// extension header.
fn connect(to: SocketAddr, dstopts: bool) -> std::io::Result<TcpStream> {
    if !dstopts {
        return TcpStream::connect_timeout(&to, Duration::from_secs(5));
    }
    use std::os::fd::AsRawFd as _;
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Next header (the kernel fills it in), length 0 (8 bytes), then PadN
    // (type 1) with 4 bytes of padding.
    let header: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: setsockopt reads `header.len()` bytes from a live buffer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            header.as_ptr().cast(),
            header.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

fn send(to: SocketAddr, bytes: u64, dstopts: bool) {
    let mut kernel = String::new();
    let report = |local: String,
                  kernel_local: &str,
                  peer: String,
                  sent: u64,
                  received: u64,
                  intact: bool,
                  error: Option<String>| {
        print_line(serde_json::json!({
            "local": local, "kernel_local": kernel_local, "peer": peer, "sent": sent,
            "received": received, "intact": intact, "error": error,
        }));
    };
    let mut stream = match connect(to, dstopts) {
        Ok(stream) => stream,
        Err(error) => {
            report(
                String::new(),
                &kernel,
                String::new(),
                0,
                0,
                false,
                Some(format!("connect: {error}")),
            );
            std::process::exit(1);
        }
    };
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    kernel = kernel_local(&stream);
    let data = pattern(bytes as usize, weir_tests::podtool::SEND_SEED);
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(error) => {
            report(
                local,
                &kernel,
                peer,
                0,
                0,
                false,
                Some(format!("clone: {error}")),
            );
            std::process::exit(1);
        }
    };
    let to_send = data.clone();
    let writer_thread = std::thread::spawn(move || {
        let result = writer.write_all(&to_send);
        let _ = writer.shutdown(Shutdown::Write);
        result
    });
    let mut received = Vec::with_capacity(data.len());
    let read_result = stream.read_to_end(&mut received);
    let write_result = writer_thread
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
    let error = match (write_result, read_result) {
        (Err(error), _) => Some(format!("write: {error}")),
        (_, Err(error)) => Some(format!("read: {error}")),
        _ => None,
    };
    let intact = error.is_none() && received == data;
    report(
        local,
        &kernel,
        peer,
        data.len() as u64,
        received.len() as u64,
        intact,
        error,
    );
    if !intact {
        std::process::exit(1);
    }
}

fn probe(to: SocketAddr, interval_ms: u64) {
    loop {
        let started = Instant::now();
        let result = (|| -> std::io::Result<(String, String, String)> {
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let local = stream.local_addr()?.to_string();
            let kernel = kernel_local(&stream);
            let peer = stream.peer_addr()?.to_string();
            stream.write_all(b"ping")?;
            stream.shutdown(Shutdown::Write)?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer)?;
            if answer != b"ping" {
                return Err(std::io::Error::other("bad echo"));
            }
            Ok((local, kernel, peer))
        })();
        match result {
            Ok((local, kernel, peer)) => print_line(serde_json::json!({
                "local": local, "kernel_local": kernel, "peer": peer, "ok": true
            })),
            Err(error) => print_line(serde_json::json!({"ok": false, "error": error.to_string()})),
        }
        std::thread::sleep(Duration::from_millis(interval_ms).saturating_sub(started.elapsed()));
    }
}

fn pingpong(to: SocketAddr, count: usize) {
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("podtool pingpong: connect: {error}");
            std::process::exit(1)
        }
    };
    let _ = stream.set_nodelay(true);
    let mut samples = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for _ in 0..count {
        let started = Instant::now();
        if stream.write_all(b"x").is_err() || stream.read_exact(&mut byte).is_err() {
            eprintln!("podtool pingpong: exchange failed");
            std::process::exit(1);
        }
        samples.push(started.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let percentile = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    print_line(
        serde_json::json!({"count": count, "p50_us": percentile(0.50), "p99_us": percentile(0.99), "max_us": percentile(1.0)}),
    );
}

fn bulk(to: SocketAddr, bytes: u64) {
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("podtool bulk: connect: {error}");
            std::process::exit(1)
        }
    };
    let chunk = pattern(256 * 1024, 7);
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if stream.write_all(&chunk[..n]).is_err() {
            eprintln!("podtool bulk: write failed");
            std::process::exit(1);
        }
        left -= n as u64;
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut count = [0u8; 8];
    if stream.read_exact(&mut count).is_err() || u64::from_be_bytes(count) != bytes {
        eprintln!("podtool bulk: the sink did not confirm {bytes} bytes");
        std::process::exit(1);
    }
    let seconds = started.elapsed().as_secs_f64();
    print_line(
        serde_json::json!({"bytes": bytes, "seconds": seconds, "gbit_per_s": bytes as f64 * 8.0 / seconds / 1e9}),
    );
}

/// One long-lived connection: 1 KiB out and back every 100 ms for `seconds`.
fn stream(to: SocketAddr, seconds: u64) {
    let result = (|| -> std::io::Result<u64> {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let chunk = pattern(1024, 11);
        let mut echo = vec![0u8; chunk.len()];
        let started = Instant::now();
        let mut exchanges = 0u64;
        while started.elapsed() < Duration::from_secs(seconds) {
            stream.write_all(&chunk)?;
            stream.read_exact(&mut echo)?;
            if echo != chunk {
                return Err(std::io::Error::other("echo differs"));
            }
            exchanges += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        stream.shutdown(Shutdown::Write)?;
        Ok(exchanges)
    })();
    match result {
        Ok(exchanges) => print_line(serde_json::json!({"ok": true, "exchanges": exchanges})),
        Err(error) => {
            print_line(serde_json::json!({"ok": false, "error": error.to_string()}));
            std::process::exit(1);
        }
    }
}

/// Connect, one byte there and back, close; as many as fit in `seconds`.
fn connrate(to: SocketAddr, seconds: u64) {
    let started = Instant::now();
    let mut connections = 0u64;
    let mut byte = [0u8; 1];
    while started.elapsed() < Duration::from_secs(seconds) {
        let ok = TcpStream::connect_timeout(&to, Duration::from_secs(5)).and_then(|mut stream| {
            stream.write_all(b"x")?;
            stream.read_exact(&mut byte)
        });
        if let Err(error) = ok {
            eprintln!("podtool connrate: {error}");
            std::process::exit(1);
        }
        connections += 1;
    }
    let per_second = connections as f64 / started.elapsed().as_secs_f64();
    print_line(serde_json::json!({"connections": connections, "per_second": per_second}));
}

/// Opens `count` connections, checks each with a 1-byte echo, prints a
/// line, then keeps them open until killed.
/// `count` threads connect at once (released together by a barrier), so
/// that the proxy sees concurrent first connections to one peer.
fn burst(to: SocketAddr, count: usize) {
    let barrier = std::sync::Barrier::new(count);
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..count)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                        .map_err(|e| format!("connect: {e}"))?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(|e| e.to_string())?;
                    let data = [7u8; 1024];
                    stream.write_all(&data).map_err(|e| format!("write: {e}"))?;
                    let mut back = [0u8; 1024];
                    stream
                        .read_exact(&mut back)
                        .map_err(|e| format!("read: {e}"))?;
                    (back == data)
                        .then_some(())
                        .ok_or_else(|| "echo differs".to_string())
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    print_line(serde_json::json!({"ok": count - errors.len(), "errors": errors}));
}

/// Opens `count` connections, each echoing `bytes` bytes (so the proxy's
/// copy path has carried data on every one), prints a line, then keeps them
/// open and idle until killed.
fn hold(to: SocketAddr, count: usize, bytes: usize) {
    raise_open_files_limit();
    let mut streams = Vec::with_capacity(count);
    let data = vec![7u8; bytes.max(1)];
    let mut back = vec![0u8; data.len()];
    for _ in 0..count {
        let stream =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).and_then(|mut stream| {
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(&data)?;
                stream.read_exact(&mut back)?;
                Ok(stream)
            });
        match stream {
            Ok(stream) => streams.push(stream),
            Err(error) => {
                eprintln!("podtool hold: {error} after {} connections", streams.len());
                std::process::exit(1);
            }
        }
    }
    print_line(serde_json::json!({"held": streams.len()}));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Soft limit up to the hard one: `hold` keeps thousands of sockets.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
