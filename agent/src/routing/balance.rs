//! Per-request endpoint choice for one cluster, following Envoy's load
//! balancers so that Weir spreads load like an Envoy sidecar would.
//!
//! A [`Balancer`] is built for one endpoint list (rebuild it when the list
//! changes) and answers an index into that list. Health is asked through a
//! closure so that the caller's outlier detector stays the source of truth.
//!
//! Panic mode: when every endpoint is unhealthy, the choice is made among
//! all of them, because sending to a possibly bad endpoint beats failing
//! every request. (Envoy enters panic mode below 50 % healthy by default;
//! Weir only when none is healthy, since outlier detection already caps
//! ejections at `max_ejection_percent`.)
//!
//! Ring hash is Envoy's ketama ring with xxHash64 (seed 0): each endpoint
//! gets `ceil(minimum_ring_size / n)` points hashed from `"<ip:port>_<i>"`,
//! and a request hash maps to the first point at or after it. So for the
//! same endpoints, request hashes ([`hash_key`]) and ring sizes, Weir and
//! Envoy choose the same endpoint.

use std::{
    fmt::Write,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::LbPolicy;

/// Envoy's default `maximum_ring_size`: the ring never grows past it.
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

pub struct Balancer {
    policy: LbPolicy,
    len: usize,
    /// Round-robin position.
    next: AtomicUsize,
    /// Ring hash only.
    ring: Ring,
    /// Maglev only: the owner of each table entry.
    maglev: Vec<u32>,
    /// See [`Balancer::with_panic_threshold`].
    panic_threshold: Option<f64>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("policy", &self.policy)
            .field("endpoints", &self.len)
            .field("ring_size", &self.ring.hashes.len())
            .field("maglev_size", &self.maglev.len())
            .finish()
    }
}

impl Balancer {
    /// `endpoints` gives the list's size and, for ring hash, the stable keys
    /// of the ring points.
    pub fn new(policy: LbPolicy, endpoints: &[SocketAddr]) -> Balancer {
        let ring = match policy {
            LbPolicy::RingHash { minimum_ring_size } => Ring::new(endpoints, minimum_ring_size),
            _ => Ring::default(),
        };
        let maglev = match policy {
            LbPolicy::Maglev { table_size } => maglev_table(endpoints, table_size),
            _ => Vec::new(),
        };
        Balancer {
            policy,
            len: endpoints.len(),
            next: AtomicUsize::new(0),
            ring,
            maglev,
            panic_threshold: None,
        }
    }

    /// Envoy's `healthy_panic_threshold` (percent): below this share of
    /// healthy endpoints every endpoint is a candidate; at 0 never, and with
    /// none healthy there is no choice. Without one, every endpoint is a
    /// candidate only when none is healthy.
    pub fn with_panic_threshold(mut self, threshold: Option<f64>) -> Balancer {
        self.panic_threshold = threshold;
        self
    }

    pub fn policy(&self) -> LbPolicy {
        self.policy
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of points on the ring (0 unless ring hash).
    pub fn ring_size(&self) -> usize {
        self.ring.hashes.len()
    }

    /// An index into the endpoint list, `None` if the list is empty (or
    /// none is healthy with a panic threshold of 0).
    /// `hash` is used by ring hash only (a random point when `None`);
    /// `active_requests` by least request only.
    pub fn pick(
        &self,
        hash: Option<u64>,
        healthy: &dyn Fn(usize) -> bool,
        active_requests: &dyn Fn(usize) -> u64,
    ) -> Option<usize> {
        let n = self.len;
        if n == 0 {
            return None;
        }
        // Panic mode: too few healthy means everybody is a candidate.
        let panic = match self.panic_threshold {
            None => !(0..n).any(healthy),
            Some(threshold) => {
                let healthy_count = (0..n).filter(|&i| healthy(i)).count();
                if threshold <= 0.0 && healthy_count == 0 {
                    return None;
                }
                (healthy_count as f64) * 100.0 < threshold * n as f64
            }
        };
        let ok = |i: usize| panic || healthy(i);
        Some(match self.policy {
            LbPolicy::RoundRobin => {
                let k = self.next.fetch_add(1, Ordering::Relaxed);
                if ok(k % n) {
                    k % n
                } else {
                    // Spread the unhealthy slot over the healthy endpoints
                    // rather than giving it all to the next one.
                    nth_ok(n, &ok, k)
                }
            }
            LbPolicy::Random => {
                let i = fastrand::usize(..n);
                if ok(i) {
                    i
                } else {
                    nth_ok(n, &ok, fastrand::usize(..))
                }
            }
            LbPolicy::LeastRequest { choice_count } => {
                least_request(n, &ok, active_requests, choice_count.max(1) as usize)
            }
            LbPolicy::RingHash { .. } => {
                let h = hash.unwrap_or_else(|| fastrand::u64(..));
                self.ring
                    .lookup(h, &ok)
                    .unwrap_or_else(|| nth_ok(n, &ok, 0))
            }
            LbPolicy::Maglev { .. } => {
                let h = hash.unwrap_or_else(|| fastrand::u64(..));
                let owner = self
                    .maglev
                    .get((h % self.maglev.len().max(1) as u64) as usize)
                    .map_or(0, |owner| *owner as usize);
                // An unhealthy owner: Envoy rebuilds the table without it;
                // Weir spreads its share over the others by the hash.
                if ok(owner) {
                    owner
                } else {
                    nth_ok(n, &ok, h as usize)
                }
            }
        })
    }
}

/// The `(k mod h)`-th acceptable endpoint, `h` being their number. At
/// least one endpoint is acceptable (panic mode guarantees it).
fn nth_ok(n: usize, ok: &dyn Fn(usize) -> bool, k: usize) -> usize {
    let h = (0..n).filter(|&i| ok(i)).count().max(1);
    (0..n).filter(|&i| ok(i)).nth(k % h).unwrap_or(0)
}

/// Envoy's power-of-`choices` choices: the least busy of `choices` distinct
/// random acceptable endpoints (all of them when there are no more than
/// `choices`). Distinct draws, unlike Envoy's draws with replacement, so
/// that with two endpoints and two choices the idle one always wins.
fn least_request(
    n: usize,
    ok: &dyn Fn(usize) -> bool,
    active: &dyn Fn(usize) -> u64,
    choices: usize,
) -> usize {
    let mut chosen: Vec<usize> = Vec::with_capacity(choices.min(n));
    if choices < n {
        // Rejection sampling: cheap while most endpoints are acceptable;
        // bounded, then the full scan below decides.
        for _ in 0..(4 * choices + 16) {
            if chosen.len() == choices {
                break;
            }
            let i = fastrand::usize(..n);
            if ok(i) && !chosen.contains(&i) {
                chosen.push(i);
            }
        }
    }
    if chosen.len() < choices {
        // Every acceptable endpoint, from a random start so that ties do not
        // always go to the same one.
        let start = fastrand::usize(..n);
        chosen.clear();
        chosen.extend((0..n).map(|j| (start + j) % n).filter(|&i| ok(i)));
    }
    let mut best = chosen.first().copied().unwrap_or(0);
    let mut best_active = active(best);
    for &i in chosen.iter().skip(1) {
        let a = active(i);
        if a < best_active {
            best = i;
            best_active = a;
        }
    }
    best
}

/// Envoy's sizing with equal weights: `ceil(minimum / n)` points each, at
/// least one, the whole ring at most [`MAX_RING_SIZE`].
fn points_per_endpoint(minimum_ring_size: u64, n: u64) -> u64 {
    minimum_ring_size
        .div_ceil(n.max(1))
        .clamp(1, (MAX_RING_SIZE / n.max(1)).max(1))
}

/// Sorted ring points: `hashes[j]` belongs to endpoint `owners[j]` (two
/// vectors: 12 bytes a point instead of 16).
#[derive(Default)]
struct Ring {
    hashes: Vec<u64>,
    owners: Vec<u32>,
}

impl Ring {
    fn new(endpoints: &[SocketAddr], minimum_ring_size: u64) -> Ring {
        let n = endpoints.len() as u64;
        if n == 0 {
            return Ring::default();
        }
        let per_endpoint = points_per_endpoint(minimum_ring_size, n);
        let mut points: Vec<(u64, u32)> = Vec::with_capacity((per_endpoint * n) as usize);
        let mut key = String::new();
        for (idx, addr) in endpoints.iter().enumerate() {
            let base = addr.to_string();
            for i in 0..per_endpoint {
                key.clear();
                key.push_str(&base);
                let _ = write!(key, "_{i}");
                points.push((hash_key(key.as_bytes()), idx as u32));
            }
        }
        points.sort_unstable();
        Ring {
            hashes: points.iter().map(|p| p.0).collect(),
            owners: points.iter().map(|p| p.1).collect(),
        }
    }

    /// The owner of the first point at or after `h` (wrapping) that is
    /// acceptable, walking on past unacceptable owners.
    fn lookup(&self, h: u64, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let len = self.hashes.len();
        if len == 0 {
            return None;
        }
        let start = self.hashes.partition_point(|&p| p < h) % len;
        (0..len)
            .map(|j| self.owners[(start + j) % len] as usize)
            .find(|&owner| ok(owner))
    }
}

/// Envoy's Maglev table (equal weights): each endpoint's permutation of
/// the table from `offset = xxHash64(key, 0) % size` and
/// `skip = xxHash64(key, 1) % (size - 1) + 1`, `key` being `ip:port`; the
/// endpoints take turns claiming their next free entry until the table is
/// full. `table[hash % size]` is a request's endpoint.
fn maglev_table(endpoints: &[SocketAddr], table_size: u64) -> Vec<u32> {
    if endpoints.is_empty() || table_size < 2 {
        return Vec::new();
    }
    let size = table_size as usize;
    let mut entries: Vec<(u64, u64, u64)> = endpoints
        .iter()
        .map(|address| {
            let key = address.to_string();
            let offset = xxh64(key.as_bytes(), 0) % table_size;
            let skip = xxh64(key.as_bytes(), 1) % (table_size - 1) + 1;
            (offset, skip, 0)
        })
        .collect();
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; size];
    let mut filled = 0;
    while filled < size {
        for (index, (offset, skip, next)) in entries.iter_mut().enumerate() {
            if filled == size {
                break;
            }
            let mut slot = ((*offset + *skip * *next) % table_size) as usize;
            while table[slot] != EMPTY {
                *next += 1;
                slot = ((*offset + *skip * *next) % table_size) as usize;
            }
            table[slot] = index as u32;
            *next += 1;
            filled += 1;
        }
    }
    table
}

/// Stable 64-bit hash for request hash policies (header, cookie, source IP,
/// query parameter values): xxHash64 with seed 0, as Envoy's
/// `HashUtil::xxHash64`, so identical across runs, builds and nodes.
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn xxh_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn xxh_merge(acc: u64, val: u64) -> u64 {
    (acc ^ xxh_round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read_u32(b: &[u8]) -> u64 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a) as u64
}

/// The reference XXH64 algorithm.
fn xxh64(input: &[u8], seed: u64) -> u64 {
    let mut rest = input;
    let mut h = if input.len() >= 32 {
        let mut v1 = seed.wrapping_add(P1).wrapping_add(P2);
        let mut v2 = seed.wrapping_add(P2);
        let mut v3 = seed;
        let mut v4 = seed.wrapping_sub(P1);
        while rest.len() >= 32 {
            v1 = xxh_round(v1, read_u64(&rest[0..]));
            v2 = xxh_round(v2, read_u64(&rest[8..]));
            v3 = xxh_round(v3, read_u64(&rest[16..]));
            v4 = xxh_round(v4, read_u64(&rest[24..]));
            rest = &rest[32..];
        }
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        xxh_merge(h, v4)
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(input.len() as u64);
    while rest.len() >= 8 {
        h ^= xxh_round(0, read_u64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        h ^= read_u32(rest).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= (b as u64).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)))
            .collect()
    }

    fn all(_: usize) -> bool {
        true
    }

    fn idle(_: usize) -> u64 {
        0
    }

    #[test]
    fn xxh64_reference_vectors() {
        assert_eq!(hash_key(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(hash_key(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(hash_key(b"abc"), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            hash_key(b"Nobody inspects the spammish repetition"),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    #[test]
    fn empty_list_picks_nothing() {
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest { choice_count: 2 },
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
            },
        ] {
            let b = Balancer::new(policy, &[]);
            assert_eq!(b.pick(Some(1), &all, &idle), None);
        }
    }

    #[test]
    fn round_robin_is_even() {
        let b = Balancer::new(LbPolicy::RoundRobin, &addrs(3));
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[b.pick(None, &all, &idle).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn round_robin_spreads_over_healthy() {
        let b = Balancer::new(LbPolicy::RoundRobin, &addrs(3));
        let healthy = |i: usize| i != 1;
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[b.pick(None, &healthy, &idle).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        assert_eq!(counts[0], 1500);
        assert_eq!(counts[2], 1500);
    }

    #[test]
    fn least_request_prefers_idle() {
        let b = Balancer::new(LbPolicy::LeastRequest { choice_count: 2 }, &addrs(2));
        let active = |i: usize| if i == 0 { 10 } else { 1 };
        for _ in 0..1000 {
            assert_eq!(b.pick(None, &all, &active), Some(1));
        }
        // P2C over many endpoints: the busiest one is almost never chosen,
        // the idle one far more often than its fair share.
        let b = Balancer::new(LbPolicy::LeastRequest { choice_count: 2 }, &addrs(10));
        let active = |i: usize| i as u64;
        let mut counts = [0; 10];
        for _ in 0..10_000 {
            counts[b.pick(None, &all, &active).unwrap()] += 1;
        }
        assert_eq!(counts[9], 0);
        assert!(counts[0] > 1500, "{counts:?}");
    }

    #[test]
    fn least_request_ties_are_spread() {
        let b = Balancer::new(LbPolicy::LeastRequest { choice_count: 5 }, &addrs(3));
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[b.pick(None, &all, &idle).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }

    #[test]
    fn random_covers_all() {
        let b = Balancer::new(LbPolicy::Random, &addrs(4));
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[b.pick(None, &all, &idle).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }

    #[test]
    fn ejected_endpoints_are_skipped() {
        let eps = addrs(4);
        let healthy = |i: usize| i == 2;
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest { choice_count: 2 },
            LbPolicy::RingHash {
                minimum_ring_size: 64,
            },
        ] {
            let b = Balancer::new(policy, &eps);
            for k in 0..200u64 {
                let busy_healthy = |i: usize| if i == 2 { 100 } else { 0 };
                let got = b.pick(Some(hash_key(&k.to_le_bytes())), &healthy, &busy_healthy);
                assert_eq!(got, Some(2), "{policy:?}");
            }
        }
    }

    #[test]
    fn all_ejected_means_panic_mode() {
        let eps = addrs(3);
        let none = |_: usize| false;
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest { choice_count: 2 },
            LbPolicy::RingHash {
                minimum_ring_size: 64,
            },
        ] {
            let b = Balancer::new(policy, &eps);
            let mut seen = [false; 3];
            for k in 0..300u64 {
                let i = b
                    .pick(Some(hash_key(&k.to_le_bytes())), &none, &idle)
                    .unwrap();
                seen[i] = true;
            }
            assert_eq!(seen, [true; 3], "{policy:?}");
        }
    }

    #[test]
    fn ring_size_follows_minimum_and_cap() {
        let ring = |min, n| {
            Balancer::new(
                LbPolicy::RingHash {
                    minimum_ring_size: min,
                },
                &addrs(n),
            )
            .ring_size()
        };
        assert_eq!(ring(1024, 3), 3 * 342);
        assert_eq!(ring(1024, 4), 1024);
        assert_eq!(ring(0, 3), 3);
        assert_eq!(points_per_endpoint(u64::MAX, 2), MAX_RING_SIZE / 2);
        assert_eq!(points_per_endpoint(u64::MAX, 3), MAX_RING_SIZE / 3);
        assert_eq!(points_per_endpoint(1, MAX_RING_SIZE * 2), 1);
    }

    #[test]
    fn ring_hash_is_stable_and_even() {
        let ring = LbPolicy::RingHash {
            minimum_ring_size: 1024,
        };
        let a = Balancer::new(ring, &addrs(3));
        let b = Balancer::new(ring, &addrs(3));
        let mut counts = [0usize; 3];
        for k in 0..10_000u32 {
            let h = hash_key(format!("user-{k}").as_bytes());
            let i = a.pick(Some(h), &all, &idle).unwrap();
            assert_eq!(Some(i), a.pick(Some(h), &all, &idle));
            assert_eq!(Some(i), b.pick(Some(h), &all, &idle));
            counts[i] += 1;
        }
        for c in counts {
            assert!((2500..=4167).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn ring_hash_removal_moves_mostly_the_removed_keys() {
        let ring = LbPolicy::RingHash {
            minimum_ring_size: 1024,
        };
        let three = addrs(3);
        let two = vec![three[0], three[2]];
        let before = Balancer::new(ring, &three);
        let after = Balancer::new(ring, &two);
        let (mut kept, mut survivors) = (0, 0);
        let mut moved_from_removed: HashMap<SocketAddr, usize> = HashMap::new();
        for k in 0..10_000u32 {
            let h = hash_key(format!("session-{k}").as_bytes());
            let old = three[before.pick(Some(h), &all, &idle).unwrap()];
            let new = two[after.pick(Some(h), &all, &idle).unwrap()];
            if old == three[1] {
                *moved_from_removed.entry(new).or_default() += 1;
            } else {
                survivors += 1;
                if old == new {
                    kept += 1;
                }
            }
        }
        // Each survivor gets more points (342 → 512), which moves some of
        // the survivors' keys too, as in Envoy; most stay put.
        assert!(kept * 100 >= survivors * 75, "{kept}/{survivors}");
        // The removed endpoint's keys go to both survivors.
        assert_eq!(moved_from_removed.len(), 2);

        // With the ring size unchanged per endpoint, survivors keep all.
        let ring = LbPolicy::RingHash {
            minimum_ring_size: 1,
        };
        let before = Balancer::new(ring, &three);
        let after = Balancer::new(ring, &two);
        for k in 0..1000u32 {
            let h = hash_key(format!("session-{k}").as_bytes());
            let old = three[before.pick(Some(h), &all, &idle).unwrap()];
            let new = two[after.pick(Some(h), &all, &idle).unwrap()];
            if old != three[1] {
                assert_eq!(old, new);
            }
        }
    }

    #[test]
    fn ring_hash_skips_ejected_by_walking_on() {
        let ring = LbPolicy::RingHash {
            minimum_ring_size: 1024,
        };
        let b = Balancer::new(ring, &addrs(3));
        let healthy = |i: usize| i != 0;
        for k in 0..2000u32 {
            let h = hash_key(format!("k{k}").as_bytes());
            let all_up = b.pick(Some(h), &all, &idle).unwrap();
            let some_down = b.pick(Some(h), &healthy, &idle).unwrap();
            assert_ne!(some_down, 0);
            // Keys of healthy endpoints do not move.
            if all_up != 0 {
                assert_eq!(all_up, some_down);
            }
        }
    }

    #[test]
    fn maglev_fills_its_table_evenly_and_moves_little_when_an_endpoint_goes() {
        let maglev = LbPolicy::Maglev { table_size: 65537 };
        let four = addrs(4);
        let b = Balancer::new(maglev, &four);
        assert_eq!(b.maglev.len(), 65537);
        for owner in 0..4u32 {
            let share = b.maglev.iter().filter(|o| **o == owner).count();
            // 65537 / 4 = 16384.25: each within one entry of it.
            assert!((16384..=16385).contains(&share), "{owner}: {share}");
        }
        // The same hash, the same endpoint.
        let h = hash_key(b"user-7");
        assert_eq!(b.pick(Some(h), &all, &idle), b.pick(Some(h), &all, &idle));
        // Without one endpoint, the keys of the others mostly stay put.
        let three: Vec<SocketAddr> = four[..3].to_vec();
        let after = Balancer::new(maglev, &three);
        let mut moved = 0;
        for k in 0..4000u32 {
            let h = hash_key(format!("session-{k}").as_bytes());
            let old = four[b.pick(Some(h), &all, &idle).unwrap()];
            let new = three[after.pick(Some(h), &all, &idle).unwrap()];
            if old != four[3] && old != new {
                moved += 1;
            }
        }
        assert!(
            moved < 400,
            "{moved} of the remaining endpoints' keys moved"
        );
    }

    #[test]
    fn the_panic_threshold_decides_when_unhealthy_endpoints_are_candidates() {
        let one_healthy = |i: usize| i == 0;
        let none_healthy = |_: usize| false;
        let picks = |b: &Balancer, healthy: &dyn Fn(usize) -> bool| {
            (0..400)
                .filter_map(|_| b.pick(None, healthy, &idle))
                .collect::<std::collections::BTreeSet<usize>>()
        };
        // Envoy's 50 %: one healthy of four is panic, all are candidates.
        let b = Balancer::new(LbPolicy::Random, &addrs(4)).with_panic_threshold(Some(50.0));
        assert_eq!(picks(&b, &one_healthy).len(), 4);
        // 0 (istiod without minHealthPercent): never panic; none healthy
        // is no choice.
        let b = Balancer::new(LbPolicy::Random, &addrs(4)).with_panic_threshold(Some(0.0));
        assert_eq!(picks(&b, &one_healthy), [0].into());
        assert_eq!(b.pick(None, &none_healthy, &idle), None);
        // Weir's default: panic only with none healthy.
        let b = Balancer::new(LbPolicy::Random, &addrs(4));
        assert_eq!(picks(&b, &one_healthy), [0].into());
        assert_eq!(picks(&b, &none_healthy).len(), 4);
    }
}
