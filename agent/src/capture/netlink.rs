//! rtnetlink requests in the calling thread's network namespace: the route,
//! rule and qdisc changes enrollment makes in a pod, sent as iproute2 would
//! send them but without running `ip` or `tc` (a fork and an exec each). A
//! netlink socket talks to the namespace it was created in for its whole
//! life, so open one after entering the pod's.
use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
    tc::{TcAttribute, TcHandle, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The kernel caps one netlink datagram at 32 KiB; twice that never truncates.
const RECEIVE_BUFFER: usize = 64 << 10;

/// `TC_H_MAKE(TC_H_CLSACT, 0)`: the handle of a `clsact` qdisc.
const CLSACT_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// The parents of a `clsact` qdisc's two filter lists.
pub const CLSACT_INGRESS: TcHandle = TcHandle {
    major: 0xffff,
    minor: TcHandle::MIN_INGRESS,
};
pub const CLSACT_EGRESS: TcHandle = TcHandle {
    major: 0xffff,
    minor: TcHandle::MIN_EGRESS,
};

/// A `NETLINK_ROUTE` socket of the namespace it was opened in.
pub struct RouteSocket {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl RouteSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<RouteSocket> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(RouteSocket {
            socket,
            sequence: 0,
            buffer: vec![0; RECEIVE_BUFFER],
        })
    }

    /// `ip [-6] route replace local 0.0.0.0/0 (::/0) dev <oif> table <table>`.
    pub fn replace_local_default_route(
        &mut self,
        family: AddressFamily,
        table: u32,
        oif: u32,
    ) -> io::Result<()> {
        let mut route = RouteMessage::default();
        route.header.address_family = family;
        route.header.table = header_table(table);
        route.header.protocol = RouteProtocol::Boot;
        route.header.scope = RouteScope::Host;
        route.header.kind = RouteType::Local;
        route.attributes = vec![RouteAttribute::Table(table), RouteAttribute::Oif(oif)];
        self.request(
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// `ip [-6] route flush table <table>` (one family, as `ip` does).
    pub fn flush_table(&mut self, family: AddressFamily, table: u32) -> io::Result<()> {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        let routes: Vec<RouteMessage> = self
            .dump(RouteNetlinkMessage::GetRoute(query))?
            .into_iter()
            .filter_map(|message| match message {
                RouteNetlinkMessage::NewRoute(route) => Some(route),
                _ => None,
            })
            .filter(|route| route_table(route) == table)
            .collect();
        for route in routes {
            match self.request(RouteNetlinkMessage::DelRoute(route), 0) {
                // Gone with an earlier one (a route's twin in the cache).
                Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {}
                result => result?,
            }
        }
        Ok(())
    }

    /// `ip [-6] rule add pref <priority> fwmark <mark> lookup <table>`.
    pub fn add_fwmark_rule(
        &mut self,
        family: AddressFamily,
        priority: u32,
        mark: u32,
        table: u32,
    ) -> io::Result<()> {
        let mut rule = RuleMessage::default();
        rule.header.family = family;
        rule.header.table = header_table(table);
        rule.header.action = RuleAction::ToTable;
        rule.attributes = vec![
            RuleAttribute::Priority(priority),
            RuleAttribute::FwMark(mark),
            RuleAttribute::Table(table),
        ];
        self.request(
            RouteNetlinkMessage::NewRule(rule),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Whether a rule of `family` at `priority` sends `mark` to `table`.
    pub fn fwmark_rule_present(
        &mut self,
        family: AddressFamily,
        priority: u32,
        mark: u32,
        table: u32,
    ) -> io::Result<bool> {
        let mut query = RuleMessage::default();
        query.header.family = family;
        let rules = self.dump(RouteNetlinkMessage::GetRule(query))?;
        Ok(rules.into_iter().any(|message| {
            let RouteNetlinkMessage::NewRule(rule) = message else {
                return false;
            };
            let (mut found_priority, mut found_mark) = (None, None);
            let mut found_table = u32::from(rule.header.table);
            for attribute in &rule.attributes {
                match attribute {
                    RuleAttribute::Priority(value) => found_priority = Some(*value),
                    RuleAttribute::FwMark(value) => found_mark = Some(*value),
                    RuleAttribute::Table(value) => found_table = *value,
                    _ => {}
                }
            }
            found_priority == Some(priority) && found_mark == Some(mark) && found_table == table
        }))
    }

    /// `ip [-6] rule del pref <priority>`.
    pub fn delete_rule(&mut self, family: AddressFamily, priority: u32) -> io::Result<()> {
        let mut rule = RuleMessage::default();
        rule.header.family = family;
        rule.attributes = vec![RuleAttribute::Priority(priority)];
        self.request(RouteNetlinkMessage::DelRule(rule), 0)
    }

    /// How many filters `tc filter show dev <ifindex> <parent>` lists.
    pub fn filter_count(&mut self, ifindex: u32, parent: TcHandle) -> io::Result<usize> {
        let mut query = TcMessage::with_index(ifindex_i32(ifindex)?);
        query.header.parent = parent;
        // Counted unparsed: a filter of any kind counts, understood or not.
        let sequence = self.send(RouteNetlinkMessage::GetTrafficFilter(query), NLM_F_DUMP)?;
        Ok(self.receive(sequence)?.len())
    }

    /// `tc qdisc del dev <ifindex> clsact`.
    pub fn delete_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let mut qdisc = TcMessage::with_index(ifindex_i32(ifindex)?);
        qdisc.header.parent = TcHandle::CLSACT;
        qdisc.header.handle = CLSACT_HANDLE;
        qdisc.attributes = vec![TcAttribute::Kind("clsact".into())];
        self.request(RouteNetlinkMessage::DelQueueDiscipline(qdisc), 0)
    }

    /// Sends a request and waits for the kernel's acknowledgement.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let sequence = self.send(message, flags | NLM_F_ACK)?;
        self.receive(sequence).map(drop)
    }

    /// Sends a dump request and parses the answer; a message this crate
    /// cannot parse is skipped (it is none of the ones asked about).
    fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let sequence = self.send(message, NLM_F_DUMP)?;
        Ok(self
            .receive(sequence)?
            .iter()
            .filter_map(
                |raw| match NetlinkMessage::<RouteNetlinkMessage>::deserialize(raw) {
                    Ok(NetlinkMessage {
                        payload: NetlinkPayload::InnerMessage(message),
                        ..
                    }) => Some(message),
                    Ok(_) => None,
                    Err(error) => {
                        tracing::debug!(%error, "skipping a netlink message");
                        None
                    }
                },
            )
            .collect())
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        Ok(self.sequence)
    }

    /// Reads the answer to request `sequence` up to its end (an
    /// acknowledgement or error, or a dump's `NLMSG_DONE`) and returns the
    /// other messages of it, unparsed.
    fn receive(&mut self, sequence: u32) -> io::Result<Vec<Vec<u8>>> {
        let mut messages = Vec::new();
        loop {
            let mut free: &mut [u8] = &mut self.buffer;
            let length = self.socket.recv(&mut free, 0)?.min(self.buffer.len());
            let mut offset = 0;
            while offset < length {
                let view = NetlinkBuffer::new_checked(&self.buffer[offset..length])
                    .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
                let size = view.length() as usize;
                let (kind, answers) = (view.message_type(), view.sequence_number() == sequence);
                let payload = view.payload();
                let code = payload
                    .get(..4)
                    .and_then(|bytes| bytes.try_into().ok())
                    .map_or(0, i32::from_ne_bytes);
                let raw = self.buffer[offset..offset + size].to_vec();
                // Messages are 4-byte aligned within a datagram.
                offset += (size + 3) & !3;
                if !answers {
                    continue;
                }
                match kind {
                    // The error code is 0 in an acknowledgement; a dump
                    // ends with one too (0 unless it failed).
                    NLMSG_ERROR | NLMSG_DONE if code < 0 => {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    NLMSG_ERROR | NLMSG_DONE => return Ok(messages),
                    _ => messages.push(raw),
                }
            }
        }
    }
}

/// The 8-bit table field of a route or rule header: tables past 255 are
/// only in the attribute.
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

fn ifindex_i32(ifindex: u32) -> io::Result<i32> {
    i32::try_from(ifindex).map_err(|_| io::Error::from_raw_os_error(libc::ENODEV))
}

/// The index of interface `name` in the calling thread's namespace.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name with a NUL"))?;
    // SAFETY: if_nametoindex reads a valid C string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index),
    }
}
