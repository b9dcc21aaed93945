//! Loading, attaching and pinning Weir's eBPF programs, and the agent's typed
//! access to their maps.
//!
//! Layout under `<bpffs>/weir/<instance>/`: `maps/<MAP>`, `progs/<program>`,
//! `links/<program>` (cgroup attachments), `links/tc/<netns cookie>` (each
//! pod's inbound classifier, a tcx link made and removed per pod by the
//! enrollment code).
use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
        tc::{TcAttach, TcAttachType, TcHandle},
    },
};
use weir_common::{
    CaptureSettings, ClientKey, EXCLUDE_INBOUND, EXCLUDE_OUTBOUND, EnrolledPod, OrigDst,
    PodRestore, SockKey, TcpStats, counter, map_name,
};

use super::cgroup_link;
use crate::config::CaptureConfig;

/// The compiled eBPF object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));

pub const TC_PROGRAM: &str = "weir_tc_ingress";

/// Cgroup attachments are bpf links, which the kernel always attaches in
/// multi mode (other programs on the cgroup keep running; `link_create`
/// rejects explicit flags), so `Single` here means "no flags".
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// One line; the full error (a verifier log spans many) goes to the
    /// debug log.
    #[error("eBPF program {program}: {summary} (run with RUST_LOG=debug for the verifier log)")]
    Program {
        program: &'static str,
        summary: String,
    },
    #[error("attaching {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning under {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct DatapathOptions<'a> {
    pub pin_dir: PathBuf,
    pub pods_parent: PathBuf,
    pub agent_cgroup: PathBuf,
    pub capture: &'a CaptureConfig,
    /// aya-log level of the programs' own logs (0 = off, 4 = debug).
    pub bpf_log_level: u8,
}

/// Original destinations recorded by `sock_ops`, shared by the proxy tasks.
/// No lock: aya's typed `remove` wants `&mut`, which put one process-wide
/// mutex on every accepted connection; a take here is a single syscall on
/// the shared descriptor, which the kernel serialises per bucket.
pub struct OrigDstTable {
    map: HashMap<MapData, ClientKey, OrigDst>,
    /// The same records by the client socket's cookie (what `connect` and
    /// `sendmsg` wrote): where a captured DNS query was going.
    by_socket: HashMap<MapData, u64, OrigDst>,
}

impl OrigDstTable {
    /// Looks up and forgets the record of one accepted connection.
    pub fn take(&self, key: &ClientKey) -> Option<OrigDst> {
        match lookup_and_delete(&self.map, key) {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(%error, "reading an original destination");
                None
            }
        }
    }

    /// Where the socket with this cookie was sending (it is kept: the
    /// socket may send again).
    pub fn of_socket(&self, cookie: u64) -> Option<OrigDst> {
        self.by_socket.get(&cookie, 0).ok()
    }
}

/// What the kernel measured of the proxy's connections (`TCP_STATS`,
/// kept by `sock_ops`). The proxy follows a socket from when it has it
/// and takes the figures when the connection ends.
pub struct TcpStatsTable {
    map: HashMap<MapData, u64, TcpStats>,
    /// `capture.tcp_stats`: off, nothing is followed.
    enabled: bool,
}

impl TcpStatsTable {
    /// Starts following the socket `fd` (its cookie, for [`Self::take`]).
    pub fn follow(&self, fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
        use std::os::fd::AsRawFd as _;
        if !self.enabled {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes a u64 into the buffer we pass.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return None;
        }
        // A zeroed entry: the program fills entries that exist, only.
        update(&self.map, &cookie, &TcpStats::default()).ok()?;
        Some(cookie)
    }

    /// The figures of a followed socket, forgotten here; `None` when the
    /// kernel said nothing of it (no RTT sample yet).
    pub fn take(&self, cookie: u64) -> Option<TcpStats> {
        lookup_and_delete(&self.map, &cookie)
            .ok()
            .flatten()
            .filter(|stats| stats.samples > 0)
    }

    /// The figures of a followed socket so far, left in place (a shared
    /// leg: see [`crate::telemetry::kernel_tcp::SharedLeg`]); `None` before
    /// the kernel's first sample.
    pub fn peek(&self, cookie: u64) -> Option<TcpStats> {
        self.map
            .get(&cookie, 0)
            .ok()
            .filter(|stats| stats.samples > 0)
    }

    /// Stops following a socket.
    pub fn forget(&self, cookie: u64) {
        let _ = lookup_and_delete(&self.map, &cookie);
    }
}

/// `bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM)` (hash maps, Linux 5.14 and later):
/// the value under `key`, removed in the same call; `None` when absent. aya
/// exposes it for queues and stacks only.
fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
) -> std::io::Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    match map_elem(map, BPF_MAP_LOOKUP_AND_DELETE_ELEM, key, value.as_mut_ptr()) {
        // SAFETY: written by the kernel (and zeroed before; `V` is `Pod`).
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(error) => Err(error),
    }
}

/// `bpf(BPF_MAP_UPDATE_ELEM)` through a shared handle (aya's typed insert
/// wants `&mut`).
fn update<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    value: &V,
) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    map_elem(
        map,
        BPF_MAP_UPDATE_ELEM,
        key,
        std::ptr::from_ref(value).cast_mut(),
    )
}

/// One map-element command on `map` with `key` and `value`.
fn map_elem<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    command: libc::c_long,
    key: &K,
    value: *mut V,
) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    /// The member of `union bpf_attr` that the map-element commands read.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let fd = aya::maps::IterableMap::map(map).fd().as_fd().as_raw_fd();
    let attr = MapElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value as u64,
        flags: 0,
    };
    // SAFETY: the kernel reads the map's key size at `key` and reads or
    // writes its value size at `value`; aya checked both against `K` and
    // `V` when the typed map was made, and both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Per-program counters, summed over CPUs.
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
}

impl Counters {
    pub fn read(&self) -> [u64; counter::COUNT as usize] {
        let mut totals = [0u64; counter::COUNT as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            if let Ok(values) = self.map.get(&(index as u32), 0) {
                *total = values.iter().sum();
            }
        }
        totals
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    /// Whether an earlier run's pinned maps (and so its enrolled pods) were
    /// taken over.
    pub adopted: bool,
    /// The inode of our ownership pin, once claimed.
    owner_inode: Option<u64>,
    pin_dir: PathBuf,
    links: Vec<(PathBuf, PinnedLink)>,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    pods: Arc<PodDatapath>,
    pub origdst: std::sync::Arc<OrigDstTable>,
    pub tcp_stats: std::sync::Arc<TcpStatsTable>,
    pub counters: std::sync::Arc<Counters>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    flow_events: Option<aya::maps::RingBuf<MapData>>,
}

fn program_error(program: &'static str, source: aya::programs::ProgramError) -> DatapathError {
    let full = source.to_string();
    tracing::debug!(program, error = %full, "eBPF program error");
    let summary = full.lines().next().unwrap_or_default().to_string();
    DatapathError::Program { program, summary }
}

fn map_error(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

fn pin_error(path: &Path) -> impl FnOnce(String) -> DatapathError + '_ {
    move |message| DatapathError::Pin {
        path: path.to_path_buf(),
        message,
    }
}

impl Datapath {
    /// Loads every program, attaches the cgroup programs (multi-attach, so
    /// other programs on the same cgroups keep running) and pins it all.
    pub fn load(options: DatapathOptions<'_>) -> Result<Datapath, DatapathError> {
        let pin_dir = options.pin_dir.clone();
        let adopted = prepare_pin_dir(&pin_dir)?;
        Datapath::load_and_attach(options, adopted).inspect_err(|_| {
            // Whatever was attached and pinned goes with its pins; adopted
            // pins stay with the run that made them (it may still be alive).
            if !adopted {
                let _ = std::fs::remove_dir_all(&pin_dir);
            }
        })
    }

    fn load_and_attach(
        options: DatapathOptions<'_>,
        adopted: bool,
    ) -> Result<Datapath, DatapathError> {
        let mut ebpf = match load_object(&options, adopted) {
            Ok(ebpf) => ebpf,
            Err(error) if adopted => {
                // A different build's maps (another layout) cannot be shared:
                // start over with new ones.
                tracing::warn!(%error, "pinned maps of the earlier run are incompatible; replacing them");
                let maps = options.pin_dir.join("maps");
                std::fs::remove_dir_all(&maps).map_err(|e| pin_error(&maps)(e.to_string()))?;
                std::fs::create_dir_all(&maps).map_err(|e| pin_error(&maps)(e.to_string()))?;
                load_object(&options, false)?
            }
            Err(error) => return Err(error),
        };

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                tracing::debug!(%error, "eBPF logs unavailable");
                None
            }
        };

        // Shared maps were pinned by the loader; the others (aya-log's ring
        // buffer) are this run's own. `.rodata`/`.bss` are the object's
        // globals, not maps operators read.
        for (name, map) in ebpf
            .maps()
            .filter(|(name, _)| !name.starts_with('.') && !SHARED_MAPS.contains(name))
        {
            let path = options.pin_dir.join("maps").join(name);
            replace_pin(&path)?;
            map.pin(&path)
                .map_err(|e| pin_error(&path)(e.to_string()))?;
        }

        let mut datapath_links = Vec::new();
        let pods_parent = open_cgroup(&options.pods_parent)?;
        let agent_cgroup = open_cgroup(&options.agent_cgroup)?;
        // (program, uapi `enum bpf_attach_type`).
        for (name, attach_type) in [
            ("weir_connect4", 10),
            ("weir_connect6", 11),
            ("weir_sendmsg4", 14),
            ("weir_sendmsg6", 15),
            ("weir_recvmsg4", 19),
            ("weir_recvmsg6", 20),
            ("weir_getpeername4", 29),
            ("weir_getpeername6", 30),
            ("weir_getsockname4", 31),
            ("weir_getsockname6", 32),
        ] {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| program_error(name, source))?;
            let attached = attach_ahead(program, &pods_parent, attach_type, &options, name)?;
            datapath_links.push(attached);
        }
        for (name, cgroup, cgroup_path) in [
            ("weir_sockops", &pods_parent, &options.pods_parent),
            ("weir_sockops_accel", &agent_cgroup, &options.agent_cgroup),
        ] {
            let program: &mut SockOps = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| program_error(name, source))?;
            let id = program.attach(cgroup, LINK_ATTACH_MODE).map_err(|source| {
                DatapathError::Attach {
                    program: name,
                    target: cgroup_path.display().to_string(),
                    source,
                }
            })?;
            let link = program
                .take_link(id)
                .map_err(|source| program_error(name, source))?;
            let link =
                FdLink::try_from(link).map_err(|e| pin_error(&options.pin_dir)(e.to_string()))?;
            datapath_links.push(pin_link(&options.pin_dir, name, link)?);
        }

        {
            let sock_hash: SockHash<_, SockKey> = SockHash::try_from(
                ebpf.map(map_name::ACCEL_SOCKETS)
                    .ok_or(DatapathError::MissingMap(map_name::ACCEL_SOCKETS))?,
            )
            .map_err(map_error(map_name::ACCEL_SOCKETS))?;
            let sock_map_fd = sock_hash
                .fd()
                .try_clone()
                .map_err(|e| pin_error(&options.pin_dir)(format!("dup sockhash fd: {e}")))?;
            let program: &mut SkMsg = program_mut(&mut ebpf, "weir_sk_msg")?;
            program
                .load()
                .map_err(|source| program_error("weir_sk_msg", source))?;
            program
                .attach(&sock_map_fd)
                .map_err(|source| DatapathError::Attach {
                    program: "weir_sk_msg",
                    target: map_name::ACCEL_SOCKETS.into(),
                    source,
                })?;
        }

        let classifier: &mut SchedClassifier = program_mut(&mut ebpf, TC_PROGRAM)?;
        classifier
            .load()
            .map_err(|source| program_error(TC_PROGRAM, source))?;

        for (name, program) in ebpf.programs_mut() {
            let path = options.pin_dir.join("progs").join(name);
            replace_pin(&path)?;
            program
                .pin(&path)
                .map_err(|e| pin_error(&path)(e.to_string()))?;
        }

        let mut settings: Array<_, CaptureSettings> = Array::try_from(
            ebpf.map_mut(map_name::SETTINGS)
                .ok_or(DatapathError::MissingMap(map_name::SETTINGS))?,
        )
        .map_err(map_error(map_name::SETTINGS))?;
        settings
            .set(
                0,
                &CaptureSettings {
                    accelerate: u32::from(options.capture.accelerate),
                    tcp_stats: u32::from(options.capture.tcp_stats),
                },
                0,
            )
            .map_err(map_error(map_name::SETTINGS))?;

        let mut excluded_ports: HashMap<_, u16, u8> = HashMap::try_from(
            ebpf.map_mut(map_name::EXCLUDED_PORTS)
                .ok_or(DatapathError::MissingMap(map_name::EXCLUDED_PORTS))?,
        )
        .map_err(map_error(map_name::EXCLUDED_PORTS))?;
        let capture = options.capture;
        // Adopted maps hold the earlier run's settings.
        let stale_ports: Vec<u16> = excluded_ports.keys().filter_map(Result::ok).collect();
        for port in stale_ports {
            let _ = excluded_ports.remove(&port);
        }
        for port in capture
            .exclude_ports
            .iter()
            .chain(capture.exclude_inbound_ports.iter())
        {
            let mut bits = 0;
            if capture.exclude_ports.contains(port) {
                bits |= EXCLUDE_OUTBOUND | EXCLUDE_INBOUND;
            }
            if capture.exclude_inbound_ports.contains(port) {
                bits |= EXCLUDE_INBOUND;
            }
            excluded_ports
                .insert(port, &bits, 0)
                .map_err(map_error(map_name::EXCLUDED_PORTS))?;
        }

        let cidrs = &capture.exclude_cidrs;
        let v4 = cidrs.iter().filter_map(|cidr| match cidr.addr {
            std::net::IpAddr::V4(addr) => Some(Key::new(
                u32::from(cidr.prefix_len),
                u32::from_ne_bytes(addr.octets()),
            )),
            std::net::IpAddr::V6(_) => None,
        });
        fill_trie(&mut ebpf, map_name::EXCLUDED_CIDRS, v4)?;
        // Network-order words, as connect6 sees an address.
        let v6 = cidrs.iter().filter_map(|cidr| match cidr.addr {
            std::net::IpAddr::V4(_) => None,
            std::net::IpAddr::V6(addr) => {
                let octets = addr.octets();
                let (chunks, _) = octets.as_chunks::<4>();
                let words: [u32; 4] = std::array::from_fn(|i| u32::from_ne_bytes(chunks[i]));
                Some(Key::new(u32::from(cidr.prefix_len), words))
            }
        });
        fill_trie(&mut ebpf, map_name::EXCLUDED_CIDRS6, v6)?;

        let enrolled = HashMap::try_from(
            ebpf.take_map(map_name::ENROLLED_PODS)
                .ok_or(DatapathError::MissingMap(map_name::ENROLLED_PODS))?,
        )
        .map_err(map_error(map_name::ENROLLED_PODS))?;
        let restore = HashMap::try_from(
            ebpf.take_map(map_name::POD_RESTORE)
                .ok_or(DatapathError::MissingMap(map_name::POD_RESTORE))?,
        )
        .map_err(map_error(map_name::POD_RESTORE))?;
        // A handle of its own on the loaded classifier (from its pin), so
        // that worker threads attach it without the rest of the datapath.
        let classifier_pin = options.pin_dir.join("progs").join(TC_PROGRAM);
        let classifier = SchedClassifier::from_pin(&classifier_pin)
            .map_err(|source| program_error(TC_PROGRAM, source))?;
        let origdst = HashMap::try_from(
            ebpf.take_map(map_name::ORIGDST_BY_CLIENT)
                .ok_or(DatapathError::MissingMap(map_name::ORIGDST_BY_CLIENT))?,
        )
        .map_err(map_error(map_name::ORIGDST_BY_CLIENT))?;
        let by_socket = HashMap::try_from(
            ebpf.take_map(map_name::ORIGDST_BY_SOCKET)
                .ok_or(DatapathError::MissingMap(map_name::ORIGDST_BY_SOCKET))?,
        )
        .map_err(map_error(map_name::ORIGDST_BY_SOCKET))?;
        let tcp_stats = HashMap::try_from(
            ebpf.take_map(map_name::TCP_STATS)
                .ok_or(DatapathError::MissingMap(map_name::TCP_STATS))?,
        )
        .map_err(map_error(map_name::TCP_STATS))?;
        let flow_events = ebpf
            .take_map(map_name::FLOW_EVENTS)
            .map(aya::maps::RingBuf::try_from)
            .transpose()
            .map_err(map_error(map_name::FLOW_EVENTS))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(map_name::COUNTERS)
                .ok_or(DatapathError::MissingMap(map_name::COUNTERS))?,
        )
        .map_err(map_error(map_name::COUNTERS))?;

        let tc_pins = options.pin_dir.join("links").join("tc");
        Ok(Datapath {
            ebpf,
            adopted,
            owner_inode: None,
            pin_dir: options.pin_dir,
            links: datapath_links,
            enrolled,
            pods: Arc::new(PodDatapath {
                classifier: Mutex::new(classifier),
                restore: Mutex::new(restore),
                tc_pins,
            }),
            origdst: std::sync::Arc::new(OrigDstTable {
                map: origdst,
                by_socket,
            }),
            tcp_stats: std::sync::Arc::new(TcpStatsTable {
                map: tcp_stats,
                enabled: options.capture.tcp_stats,
            }),
            counters: std::sync::Arc::new(Counters { map: counters }),
            logger,
            flow_events,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Hands the flow-event ring buffer to its reader (`weir trace`).
    pub fn take_flow_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.flow_events.take()
    }

    /// Hands the aya-log reader to the caller (it is polled on the runtime).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    pub fn enroll(&mut self, netns_cookie: u64, pod: EnrolledPod) -> Result<(), DatapathError> {
        self.enrolled
            .insert(&netns_cookie, &pod, 0)
            .map_err(map_error(map_name::ENROLLED_PODS))
    }

    /// Pod namespaces in the enrolled-pods map (with adopted maps, also
    /// those an earlier run enrolled).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Whether the pod's namespace is in the enrolled-pods map (put there by
    /// this run or an earlier one).
    pub fn is_enrolled(&self, netns_cookie: u64) -> bool {
        self.enrolled.get(&netns_cookie, 0).is_ok()
    }

    /// What enrollment's worker threads use of the datapath.
    pub fn pods(&self) -> Arc<PodDatapath> {
        self.pods.clone()
    }

    /// Marks this run as the owner of the pins, once it serves every pod it
    /// should: the pin at [`OWNER_PIN`] (our classifier, pinned once more)
    /// gets a new bpffs inode. An earlier run still alive sees the change
    /// and hands over; before this point it keeps serving.
    pub fn claim_ownership(&mut self) -> Result<(), DatapathError> {
        let path = self.pin_dir.join(OWNER_PIN);
        replace_pin(&path)?;
        let classifier: &mut SchedClassifier = program_mut(&mut self.ebpf, TC_PROGRAM)?;
        classifier
            .pin(&path)
            .map_err(|e| pin_error(&path)(e.to_string()))?;
        let inode = std::fs::metadata(&path)
            .map(|metadata| std::os::unix::fs::MetadataExt::ino(&metadata))
            .map_err(|e| pin_error(&path)(e.to_string()))?;
        self.owner_inode = Some(inode);
        Ok(())
    }

    /// Whether a newer agent of this instance has claimed the pins: this
    /// one must leave the kernel state alone from now on.
    pub fn superseded(&self) -> bool {
        let Some(ours) = self.owner_inode else {
            return false;
        };
        match std::fs::metadata(self.pin_dir.join(OWNER_PIN)) {
            Ok(metadata) => std::os::unix::fs::MetadataExt::ino(&metadata) != ours,
            // The pins are gone: nobody else owns them.
            Err(_) => false,
        }
    }

    /// Leaves every attachment and pin to the agent that superseded this
    /// one; this process's own references go with it.
    pub fn abandon(self) {
        // Unlike `shutdown`, nothing is unpinned or detached: dropping our
        // file descriptors leaves the pinned objects to the successor.
        drop(self);
    }

    /// Removes the pod's enrolled-pods entry and its restore record (a pod
    /// an earlier run enrolled and this one drops cannot be reached to
    /// restore; release reads the record first with [`Self::restore_record`]).
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), DatapathError> {
        self.pods.forget_restore_record(netns_cookie);
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) => Ok(()),
            Err(source) if is_not_found(&source) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                map: map_name::ENROLLED_PODS,
                source,
            }),
        }
    }

    /// What enrollment recorded of the pod's state before it changed it
    /// (this run, or an earlier run of the instance).
    pub fn restore_record(&self, netns_cookie: u64) -> Option<PodRestore> {
        self.pods.restore_record(netns_cookie)
    }

    /// Detaches everything and removes the pins. TC filters must have been
    /// detached (per pod, in their namespaces) before.
    pub fn shutdown(self) {
        let Datapath {
            ebpf,
            pin_dir,
            links,
            ..
        } = self;
        for (path, link) in links {
            match link.unpin() {
                Ok(fd_link) => drop(fd_link),
                Err(error) => tracing::warn!(path = %path.display(), %error, "cannot unpin link"),
            }
        }
        drop(ebpf);
        if let Err(error) = std::fs::remove_dir_all(&pin_dir) {
            tracing::warn!(path = %pin_dir.display(), %error, "cannot remove pins");
        }
    }
}

/// A delete of a key that is not there: aya reports the syscall's ENOENT
/// (older versions had `KeyNotFound`).
fn is_not_found(error: &aya::maps::MapError) -> bool {
    match error {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|_| DatapathError::MissingProgram(name))
}

fn open_cgroup(path: &Path) -> Result<File, DatapathError> {
    File::open(path).map_err(|source| DatapathError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

fn pin_link(
    pin_dir: &Path,
    name: &str,
    link: FdLink,
) -> Result<(PathBuf, PinnedLink), DatapathError> {
    let path = pin_dir.join("links").join(name);
    // An earlier run's link at this path: dropping its pin detaches its
    // program (ours is attached already, so capture never pauses).
    replace_pin(&path)?;
    let pinned = link
        .pin(&path)
        .map_err(|e| pin_error(&path)(e.to_string()))?;
    Ok((path, pinned))
}

/// Attaches a socket-address hook of the pods' parent cgroup ahead of the
/// programs others attached there or below (`BPF_F_PREORDER`), so that it
/// sees what the application dialled whatever a CNI attached, and pins its
/// link. A kernel without the flag (before Linux 6.15) gets the
/// attach-order link aya makes, and a warning naming what that risks.
fn attach_ahead(
    program: &mut CgroupSockAddr,
    cgroup: &File,
    attach_type: u32,
    options: &DatapathOptions<'_>,
    name: &'static str,
) -> Result<(PathBuf, PinnedLink), DatapathError> {
    use std::os::fd::AsFd as _;
    let preordered = {
        let fd = program.fd().map_err(|source| program_error(name, source))?;
        cgroup_link::link_create(
            fd.as_fd(),
            cgroup.as_fd(),
            attach_type,
            cgroup_link::BPF_F_PREORDER,
        )
    };
    match preordered {
        Ok(link) => {
            let path = options.pin_dir.join("links").join(name);
            replace_pin(&path)?;
            cgroup_link::pin(link.as_fd(), &path).map_err(|e| pin_error(&path)(e.to_string()))?;
            let pinned =
                PinnedLink::from_pin(&path).map_err(|e| pin_error(&path)(e.to_string()))?;
            Ok((path, pinned))
        }
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                program = name,
                "the kernel has no BPF_F_PREORDER (Linux 6.15): Weir's socket hooks run in attach order, so a socket load balancer attached earlier on {} or below hides service addresses from Weir",
                options.pods_parent.display()
            );
            let id = program.attach(cgroup, LINK_ATTACH_MODE).map_err(|source| {
                DatapathError::Attach {
                    program: name,
                    target: options.pods_parent.display().to_string(),
                    source,
                }
            })?;
            let link = program
                .take_link(id)
                .map_err(|source| program_error(name, source))?;
            let link =
                FdLink::try_from(link).map_err(|e| pin_error(&options.pin_dir)(e.to_string()))?;
            pin_link(&options.pin_dir, name, link)
        }
        Err(error) => Err(DatapathError::Attach {
            program: name,
            target: options.pods_parent.display().to_string(),
            source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: error,
            }),
        }),
    }
}

/// Replaces what an LPM trie of exclusions holds (adopted maps hold the
/// earlier run's) with `keys`, each excluded outbound.
fn fill_trie<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: impl Iterator<Item = Key<K>>,
) -> Result<(), DatapathError> {
    let mut trie: LpmTrie<_, K, u8> =
        LpmTrie::try_from(ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?)
            .map_err(map_error(name))?;
    let stale: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for key in stale {
        let _ = trie.remove(&key);
    }
    for key in keys {
        trie.insert(&key, &EXCLUDE_OUTBOUND, 0)
            .map_err(map_error(name))?;
    }
    Ok(())
}

/// Maps shared across runs of an agent instance (pinned by name): a new
/// agent takes over the enrolled pods and connections in flight of the one
/// before, so a restart neither drops capture nor loses records, and
/// whichever run releases a pod restores what it had before its first
/// enrollment (`POD_RESTORE`). The acceleration sockhash is each run's own:
/// its `sk_msg` link allows one program per map, and it only ever holds the
/// run's own sockets.
const SHARED_MAPS: [&str; 9] = [
    map_name::ENROLLED_PODS,
    map_name::ORIGDST_BY_SOCKET,
    map_name::ORIGDST_BY_CLIENT,
    map_name::EXCLUDED_PORTS,
    map_name::EXCLUDED_CIDRS,
    map_name::EXCLUDED_CIDRS6,
    map_name::SETTINGS,
    map_name::COUNTERS,
    map_name::POD_RESTORE,
];

/// The pin whose inode tells which run owns the pin directory.
const OWNER_PIN: &str = "owner";

fn load_object(options: &DatapathOptions<'_>, adopted: bool) -> Result<Ebpf, DatapathError> {
    let maps = options.pin_dir.join("maps");
    let paths: Vec<(&'static str, PathBuf)> = SHARED_MAPS
        .iter()
        .map(|name| (*name, maps.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    loader.override_global(aya_log::LEVEL, &options.bpf_log_level, true);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let ebpf = loader.load(EBPF_OBJECT)?;
    if adopted {
        tracing::info!(path = %maps.display(), "adopted the maps of an earlier run");
    }
    Ok(ebpf)
}

/// Makes the pin directory. Returns whether an earlier run of this instance
/// left maps there (to adopt); its program pins are dropped (links hold what
/// is attached), its links are replaced one by one after ours attach.
fn prepare_pin_dir(pin_dir: &Path) -> Result<bool, DatapathError> {
    let adopted = pin_dir.join("maps").is_dir();
    if adopted {
        tracing::warn!(path = %pin_dir.display(), "adopting pins left by an earlier run");
        let progs = pin_dir.join("progs");
        if progs.exists() {
            std::fs::remove_dir_all(&progs).map_err(|e| pin_error(&progs)(e.to_string()))?;
        }
    } else if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir).map_err(|e| pin_error(pin_dir)(e.to_string()))?;
    }
    for sub in ["maps", "progs", "links"] {
        let dir = pin_dir.join(sub);
        std::fs::create_dir_all(&dir).map_err(|e| pin_error(&dir)(e.to_string()))?;
    }
    Ok(adopted)
}

/// Removes a pin that an earlier run left at `path`, if any.
fn replace_pin(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(pin_error(path)(error.to_string())),
    }
}

/// The part of the datapath enrollment uses per pod, shared with the worker
/// threads that do the pods' namespace work: the inbound classifier and the
/// restore records. Each lock is held for one netlink request or map call.
pub struct PodDatapath {
    classifier: Mutex<SchedClassifier>,
    restore: Mutex<HashMap<MapData, u64, PodRestore>>,
    /// `<pin dir>/links/tc`: each pod's classifier link, by the pod's
    /// namespace cookie.
    tc_pins: PathBuf,
}

/// The classifier's tcx link on one pod's interface, pinned so that it
/// outlives the agent (inbound stays steered, and fails closed, while no
/// agent runs). Release unpins it, if the pin is still this link (a
/// successor may have replaced it); dropped any other way, it stays.
pub struct TcFilter {
    pin: PathBuf,
    link_id: u32,
}

impl TcFilter {
    /// Detaches the classifier: its pin goes, and with it the link. Any
    /// thread may do it; if the interface is gone, so is the attachment.
    pub fn detach(self) -> Result<(), DatapathError> {
        let pinned = match PinnedLink::from_pin(&self.pin) {
            Ok(pinned) => pinned,
            // Gone already (the pin directory removed).
            Err(_) if !self.pin.exists() => return Ok(()),
            Err(error) => return Err(pin_error(&self.pin)(error.to_string())),
        };
        let link = FdLink::from(pinned);
        let current = link
            .info()
            .map_err(|e| pin_error(&self.pin)(e.to_string()))?
            .id();
        if current == self.link_id {
            std::fs::remove_file(&self.pin).map_err(|e| pin_error(&self.pin)(e.to_string()))?;
        }
        Ok(())
    }
}

impl PodDatapath {
    /// The kernel's id of the inbound classifier program.
    pub fn classifier_id(&self) -> Option<u32> {
        let classifier = self
            .classifier
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        classifier.info().ok().map(|info| info.id())
    }

    fn restore_map(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, PodRestore>> {
        self.restore
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What enrollment recorded of the pod's state before it changed it
    /// (this run, or an earlier run of the instance).
    pub fn restore_record(&self, netns_cookie: u64) -> Option<PodRestore> {
        self.restore_map().get(&netns_cookie, 0).ok()
    }

    /// Records something enrollment is about to change in a pod. Fails
    /// (before anything changed) when the map is full.
    pub fn update_restore_record(
        &self,
        netns_cookie: u64,
        update: impl FnOnce(&mut PodRestore),
    ) -> Result<(), DatapathError> {
        let mut map = self.restore_map();
        let mut record = map.get(&netns_cookie, 0).unwrap_or_default();
        update(&mut record);
        map.insert(&netns_cookie, &record, 0)
            .map_err(map_error(map_name::POD_RESTORE))
    }

    /// Forgets a pod's restore record once release has restored it.
    pub fn forget_restore_record(&self, netns_cookie: u64) {
        match self.restore_map().remove(&netns_cookie) {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => tracing::warn!(netns_cookie, %error, "removing a pod's restore record"),
        }
    }

    /// Attaches the inbound classifier to `interface` ahead of every other
    /// tcx program there (`BPF_F_BEFORE`), and pins the link. The calling
    /// thread must be inside the interface's network namespace.
    ///
    /// Why tcx: the kernel runs all tcx programs before any clsact filter,
    /// and skips the clsact chain when one returns `TCX_PASS`, so a CNI's
    /// tcx program would silently switch off a clsact classifier. First in
    /// the tcx chain, Weir's program sees every packet; it returns
    /// `TCX_NEXT` for what it does not steer, so the programs after it
    /// (tcx and clsact) run as before. It never moves or detaches them.
    pub fn attach_tc(&self, interface: &str, netns_cookie: u64) -> Result<TcFilter, DatapathError> {
        let interface_c = std::ffi::CString::new(interface).map_err(|_| DatapathError::Attach {
            program: TC_PROGRAM,
            target: interface.to_string(),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let attach_error = |source| DatapathError::Attach {
            program: TC_PROGRAM,
            target: interface.to_string(),
            source,
        };
        let mut classifier = self
            .classifier
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let link = classifier
            .attach(
                interface_c.as_c_str(),
                TcAttach::Tcx {
                    attach_type: TcAttachType::Ingress,
                    order: LinkOrder::first(),
                },
            )
            .map_err(attach_error)?;
        let link = classifier
            .take_link(link)
            .map_err(|source| program_error(TC_PROGRAM, source))?;
        drop(classifier);
        let link = FdLink::try_from(link).map_err(|e| pin_error(&self.tc_pins)(e.to_string()))?;
        let link_id = link
            .info()
            .map_err(|e| pin_error(&self.tc_pins)(e.to_string()))?
            .id();
        let pin = self.tc_pins.join(netns_cookie.to_string());
        std::fs::create_dir_all(&self.tc_pins)
            .map_err(|e| pin_error(&self.tc_pins)(e.to_string()))?;
        // An earlier run's link for this pod (a successor taking over, or
        // a restart): ours is attached first already, so removing that pin
        // detaches the old one without a gap.
        replace_pin(&pin)?;
        link.pin(&pin).map_err(|e| pin_error(&pin)(e.to_string()))?;
        // A netlink filter of an agent from before tcx: it would run after
        // Weir's program for nothing.
        let _ = aya::programs::tc::qdisc_detach_program(
            interface_c.as_c_str(),
            TcHandle::from(TcAttachType::Ingress),
            TC_PROGRAM,
        );
        Ok(TcFilter { pin, link_id })
    }
}
