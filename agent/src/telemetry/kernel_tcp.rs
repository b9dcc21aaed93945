//! What the kernel measured of a proxied connection's network leg: `sock_ops`
//! keeps it per socket (`TCP_STATS`, on each RTT sample, retransmit and at
//! close) for the sockets the proxy follows; the proxy takes it when the
//! connection ends and puts it next to what it knows (identities, bytes,
//! outcome): the flow event, the access log, and Istio-labelled metrics.
//!
//! A connection carried by a socket it shares (an HBONE stream in its
//! tunnel, a request on a pooled upstream connection) gets that socket's
//! figures as a [`LegShare`]: the round trips as of its end, the segments
//! and bytes the socket carried while it lasted (others' too), and the
//! retransmits since the last share ended, so that each retransmit is
//! counted once across all the records of a socket.
use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::capture::datapath::TcpStatsTable;

/// One connection's kernel figures, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelTcp {
    /// Smoothed round-trip time at the end, microseconds.
    pub srtt_us: u32,
    /// The lowest round-trip time seen, microseconds.
    pub min_rtt_us: u32,
    /// Segments retransmitted.
    pub retransmits: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    /// Congestion window at the end, in segments.
    pub snd_cwnd: u32,
    /// Bytes the peer acknowledged, and bytes received, as the kernel
    /// counts them on this leg (the proxy's own counts are the client's).
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Measured on a socket that carried other connections too (an HBONE
    /// tunnel, a pooled upstream connection): see [`LegShare`].
    #[serde(default)]
    pub shared: bool,
}

impl From<weir_common::TcpStats> for KernelTcp {
    fn from(stats: weir_common::TcpStats) -> Self {
        KernelTcp {
            srtt_us: stats.srtt_us,
            min_rtt_us: stats.min_rtt_us,
            retransmits: stats.total_retrans,
            segs_in: stats.segs_in,
            segs_out: stats.segs_out,
            snd_cwnd: stats.snd_cwnd,
            bytes_acked: stats.bytes_acked,
            bytes_received: stats.bytes_received,
            shared: false,
        }
    }
}

impl std::fmt::Display for KernelTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "srtt={}us min_rtt={}us retrans={} segs={}/{} cwnd={} acked={} received={}",
            self.srtt_us,
            self.min_rtt_us,
            self.retransmits,
            self.segs_in,
            self.segs_out,
            self.snd_cwnd,
            self.bytes_acked,
            self.bytes_received
        )?;
        if self.shared {
            f.write_str(" leg=shared")?;
        }
        Ok(())
    }
}

/// A socket followed for the records of everything it carries; it is
/// forgotten when the last of them, and the socket's owner, let it go.
pub struct SharedLeg {
    cookie: u64,
    table: Arc<TcpStatsTable>,
    /// The socket's retransmits already given to a record.
    attributed: AtomicU32,
}

impl SharedLeg {
    /// Starts following `socket`; `None` when kernel telemetry is off.
    pub fn follow(
        telemetry: &super::Telemetry,
        socket: std::os::fd::BorrowedFd<'_>,
    ) -> Option<Arc<SharedLeg>> {
        let table = telemetry.kernel_tcp.clone()?;
        let cookie = table.follow(socket)?;
        Some(Arc::new(SharedLeg {
            cookie,
            table,
            attributed: AtomicU32::new(0),
        }))
    }

    /// A record's share, from now.
    pub fn begin(self: &Arc<Self>) -> LegShare {
        LegShare {
            start: self.table.peek(self.cookie).unwrap_or_default(),
            leg: self.clone(),
        }
    }
}

impl Drop for SharedLeg {
    fn drop(&mut self) {
        self.table.forget(self.cookie);
    }
}

/// One record's part of a [`SharedLeg`].
pub struct LegShare {
    leg: Arc<SharedLeg>,
    start: weir_common::TcpStats,
}

impl LegShare {
    /// The figures for the record ending now; `None` before the kernel's
    /// first sample of the socket.
    pub fn end(&self) -> Option<KernelTcp> {
        let now = self.leg.table.peek(self.leg.cookie)?;
        Some(share(&self.start, &now, &self.leg.attributed))
    }
}

/// The record's figures between `start` and `now`; the retransmits since
/// the last share ended (`attributed` moves on to `now`'s).
fn share(
    start: &weir_common::TcpStats,
    now: &weir_common::TcpStats,
    attributed: &AtomicU32,
) -> KernelTcp {
    let before = attributed.fetch_max(now.total_retrans, Ordering::Relaxed);
    KernelTcp {
        srtt_us: now.srtt_us,
        min_rtt_us: now.min_rtt_us,
        retransmits: now.total_retrans.saturating_sub(before),
        segs_in: now.segs_in.wrapping_sub(start.segs_in),
        segs_out: now.segs_out.wrapping_sub(start.segs_out),
        snd_cwnd: now.snd_cwnd,
        bytes_acked: now.bytes_acked.saturating_sub(start.bytes_acked),
        bytes_received: now.bytes_received.saturating_sub(start.bytes_received),
        shared: true,
    }
}

/// Round-trip buckets, seconds: 25 µs (veth on one host) to 1 s.
pub const RTT_SECONDS_BUCKETS: [f64; 12] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(retrans: u32, segs: u32, bytes: u64) -> weir_common::TcpStats {
        weir_common::TcpStats {
            srtt_us: 100,
            min_rtt_us: 50,
            total_retrans: retrans,
            segs_in: segs,
            segs_out: segs,
            bytes_acked: bytes,
            bytes_received: bytes,
            samples: 1,
            ..Default::default()
        }
    }

    #[test]
    fn each_retransmit_goes_to_one_share_and_traffic_is_counted_from_each_start() {
        let attributed = AtomicU32::new(0);
        // Two streams overlap: the first starts at 0, the second at 10
        // segments; 3 retransmits happen, then 2 more.
        let first = stats(0, 0, 0);
        let second = stats(0, 10, 1000);
        let ends_first = share(&first, &stats(3, 30, 3000), &attributed);
        let ends_second = share(&second, &stats(5, 50, 5000), &attributed);
        assert_eq!(ends_first.retransmits, 3);
        assert_eq!(ends_second.retransmits, 2);
        assert_eq!(ends_first.segs_out, 30);
        assert_eq!(ends_second.segs_out, 40);
        assert_eq!(ends_second.bytes_acked, 4000);
        assert!(ends_first.shared && ends_second.shared);
        // A share ending on an older sample than the last one counted
        // gets none.
        assert_eq!(
            share(&first, &stats(4, 40, 4000), &attributed).retransmits,
            0
        );
    }
}
