//! Sockets the proxy creates inside pods' namespaces.
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// A listener bound inside the calling thread's namespace.
pub fn listener(
    addr: SocketAddr,
    transparent: bool,
    mark: Option<u32>,
) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // A successor agent binds the same addresses in the pod while this one
    // still serves (a hand-over without refused connects).
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if transparent {
        // Without IP(V6)_TRANSPARENT the kernel never answers SYNs that TC
        // assigned to this socket for an address it is not bound to.
        set_transparent(&socket, addr)?;
    }
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A pod's DNS listener (UDP), bound inside the calling thread's namespace;
/// in a reuseport group, as the TCP listeners are, for a successor agent.
pub fn udp_listener(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// An unconnected, non-blocking stream socket for an upstream connection,
/// marked so the capture programs leave it alone. With `source`, it is bound
/// (transparently) to that address, so the destination sees the true client.
pub fn upstream(
    destination: SocketAddr,
    mark: u32,
    source: Option<SocketAddr>,
) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = Socket::new(
        Domain::for_address(destination),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(source) = source {
        set_transparent(&socket, source)?;
        socket.bind(&SocketAddr::new(source.ip(), 0).into())?;
    }
    socket.set_nonblocking(true)?;
    let stream: std::net::TcpStream = socket.into();
    Ok(tokio::net::TcpSocket::from_std_stream(stream))
}

/// `IP_TRANSPARENT` or `IPV6_TRANSPARENT`, for a socket of `addr`'s family:
/// it may bind (and accept for) addresses that are not the pod's.
fn set_transparent(socket: &Socket, addr: SocketAddr) -> std::io::Result<()> {
    if addr.is_ipv6() {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}
