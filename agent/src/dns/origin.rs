//! Which resolver a captured query was meant for. The pod's DNS listener
//! sees only the client socket's loopback address; the kernel knows that
//! socket (sock_diag gives its cookie) and the capture programs recorded,
//! by cookie, where it was sending.
use std::net::SocketAddr;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

/// The cookie of the UDP socket at `client` that sent to the DNS listener
/// at `listener`. Called inside the pod's namespace (the kernel answers
/// sock_diag for the namespace the netlink socket was made in).
pub fn client_cookie(listener: SocketAddr, client: SocketAddr) -> std::io::Result<u64> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    // One socket by its addresses, not a dump. For an exact lookup the
    // kernel reads the request's source as the remote end (udp_diag's
    // "swapped for historical reasons"): the listener.
    let request = InetRequest {
        family: if client.is_ipv4() { AF_INET } else { AF_INET6 },
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: listener.port(),
            destination_port: client.port(),
            source_address: listener.ip(),
            destination_address: client.ip(),
            interface_id: 0,
            // All ones: "any cookie" (INET_DIAG_NOCOOKIE).
            cookie: [0xff; 8],
        },
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    packet.finalize();
    let mut buffer = vec![0; packet.buffer_len()];
    packet.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    // The kernel answers within the send: the reply is queued already.
    let mut reply = vec![0; 4096];
    let size = socket.recv(&mut &mut reply[..], libc::MSG_DONTWAIT)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&reply[..size])
        .map_err(|error| std::io::Error::other(format!("sock_diag reply: {error}")))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Ok(u64::from_ne_bytes(response.header.socket_id.cookie))
        }
        NetlinkPayload::Error(error) => Err(error
            .code
            .map(|code| std::io::Error::from_raw_os_error(-code.get()))
            .unwrap_or_else(|| std::io::Error::other("sock_diag: empty error"))),
        other => Err(std::io::Error::other(format!(
            "sock_diag: unexpected reply {other:?}"
        ))),
    }
}
