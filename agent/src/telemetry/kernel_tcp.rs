//! What the kernel measured of a proxied connection's network leg: `sock_ops`
//! keeps it per socket (`TCP_STATS`, on each RTT sample, retransmit and at
//! close) for the sockets the proxy follows; the proxy takes it when the
//! connection ends and puts it next to what it knows (identities, bytes,
//! outcome): the flow event, the access log, and Istio-labelled metrics.
use serde::{Deserialize, Serialize};

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
        )
    }
}

/// Round-trip buckets, seconds: 25 µs (veth on one host) to 1 s.
pub const RTT_SECONDS_BUCKETS: [f64; 12] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0,
];
