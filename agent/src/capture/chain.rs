//! What runs next to Weir's programs: the tcx chain ahead of its inbound
//! classifier on a pod's interface, and others' cgroup attachments that
//! Weir's would shadow.
//!
//! Weir attaches its classifier first in the tcx chain, but another agent
//! can insert a program ahead of it later (`BPF_F_BEFORE`). One that
//! returns `TCX_PASS` ends the chain there: Weir's program never sees the
//! packet, and a STRICT pod takes plaintext again. The kernel does not say
//! so; this asks it for the chain (`BPF_PROG_QUERY`), so the agent can name
//! the programs and count the pods (`weir_classifier_shadowed_pods`).
use std::io;

/// uapi `enum bpf_cmd` and `enum bpf_attach_type`.
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;

/// The `query` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    /// `target_fd` or `target_ifindex`.
    target: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// `BPF_PROG_QUERY` of `target` (an ifindex for tcx, a cgroup's
/// descriptor for cgroup hooks): the attached programs' ids in the order
/// the kernel runs them, and the hook's attach flags.
fn query(target: u32, attach_type: u32, query_flags: u32) -> io::Result<(Vec<u32>, u32)> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target,
        attach_type,
        query_flags,
        prog_ids: ids.as_mut_ptr() as u64,
        count: ids.len() as u32,
        ..QueryAttr::default()
    };
    // SAFETY: `attr` is the `#[repr(C)]` query member of `union bpf_attr`,
    // passed with its size; `prog_ids` points at `count` writable words.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            std::ptr::from_mut(&mut attr).cast::<libc::c_void>(),
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate((attr.count as usize).min(ids.len()));
    Ok((ids, attr.attach_flags))
}

/// The ids of the programs on `ifindex`'s tcx ingress chain, in the order
/// the kernel runs them. The calling thread must be in the interface's
/// network namespace.
pub fn tcx_ingress(ifindex: u32) -> io::Result<Vec<u32>> {
    query(ifindex, BPF_TCX_INGRESS, 0).map(|(ids, _)| ids)
}

/// The programs that run ahead of `ours` in `chain` (empty when it is
/// first, or absent: nothing then runs ahead of a classifier that is not
/// there, which enrollment reports itself).
pub fn ahead_of(chain: &[u32], ours: u32) -> &[u32] {
    match chain.iter().position(|id| *id == ours) {
        Some(position) => &chain[..position],
        None => &[],
    }
}

/// `id name` for each program, as `bpftool prog show id` would name it.
pub fn describe(ids: &[u32]) -> String {
    chain_programs(ids, &[])
        .iter()
        .map(|program| match program.name.as_str() {
            "" => program.id.to_string(),
            name => format!("{} {name}", program.id),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Weir's cgroup hooks: (uapi `enum bpf_attach_type`, name).
pub const CGROUP_HOOKS: [(u32, &str); 11] = [
    (3, "sock_ops"),
    (10, "connect4"),
    (11, "connect6"),
    (14, "sendmsg4"),
    (15, "sendmsg6"),
    (19, "recvmsg4"),
    (20, "recvmsg6"),
    (29, "getpeername4"),
    (30, "getpeername6"),
    (31, "getsockname4"),
    (32, "getsockname6"),
];

/// The hooks where Weir reads the destination the application dialled: a
/// program ahead of Weir's there can change what Weir sees.
pub const DESTINATION_HOOKS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

/// uapi `BPF_F_ALLOW_MULTI`.
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

/// The programs attached to `cgroup` itself for `attach_type`, and whether
/// they were attached with `BPF_F_ALLOW_MULTI` (bpf links always are).
pub fn cgroup_programs(cgroup: &std::fs::File, attach_type: u32) -> io::Result<(Vec<u32>, bool)> {
    use std::os::fd::AsRawFd as _;
    query(cgroup.as_raw_fd() as u32, attach_type, 0)
        .map(|(ids, flags)| (ids, flags & BPF_F_ALLOW_MULTI != 0))
}

/// uapi `BPF_F_QUERY_EFFECTIVE`.
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// Every program that runs for a socket of `cgroup` on `attach_type`, its
/// ancestors' included, in the order the kernel runs them.
pub fn cgroup_effective(cgroup: &std::fs::File, attach_type: u32) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    query(
        cgroup.as_raw_fd() as u32,
        attach_type,
        BPF_F_QUERY_EFFECTIVE,
    )
    .map(|(ids, _)| ids)
}

/// One program of a chain, as `weir bpf` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainProgram {
    pub id: u32,
    pub name: String,
    /// One of the programs Weir pinned.
    pub weir: bool,
}

/// A hook's chain: the cgroup hooks on the pods' parent cgroup, or a pod's
/// tcx ingress.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chain {
    /// `connect4`…, or `tcx ingress`.
    pub hook: String,
    /// The cgroup path, or `<pod> <interface>`.
    pub target: String,
    pub programs: Vec<ChainProgram>,
}

/// Names `ids` and marks Weir's (`ours`).
pub fn chain_programs(ids: &[u32], ours: &[u32]) -> Vec<ChainProgram> {
    let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| ids.contains(&info.id()))
        .map(|info| (info.id(), info.name_as_str().unwrap_or("?").to_owned()))
        .collect();
    ids.iter()
        .map(|id| ChainProgram {
            id: *id,
            name: names.get(id).cloned().unwrap_or_default(),
            weir: ours.contains(id),
        })
        .collect()
}

/// The ids of the programs pinned under `<pin_dir>/progs`: Weir's.
pub fn pinned_program_ids(pin_dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_dir(pin_dir.join("progs"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| aya::programs::ProgramInfo::from_pin(entry.path()).ok())
        .map(|info| info.id())
        .collect()
}

/// Weir's cgroup hooks as the kernel runs them for sockets under
/// `pods_parent` (the parent's ancestors' programs included).
pub fn cgroup_chains(pods_parent: &std::path::Path, ours: &[u32]) -> io::Result<Vec<Chain>> {
    let cgroup = std::fs::File::open(pods_parent)?;
    CGROUP_HOOKS
        .iter()
        .map(|(attach_type, hook)| {
            Ok(Chain {
                hook: (*hook).to_string(),
                target: pods_parent.display().to_string(),
                programs: chain_programs(&cgroup_effective(&cgroup, *attach_type)?, ours),
            })
        })
        .collect()
}

/// The chain as one line: `id name` in order, Weir's marked with `*`.
pub fn render(chain: &Chain) -> String {
    let programs: Vec<String> = chain
        .programs
        .iter()
        .map(|program| {
            let mark = if program.weir { "*" } else { "" };
            format!("{mark}{} {}", program.id, program.name)
        })
        .collect();
    format!(
        "  {:<14} {}: {}",
        chain.hook,
        chain.target,
        if programs.is_empty() {
            "(none)".to_string()
        } else {
            programs.join(" -> ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_ahead_are_those_before_ours() {
        assert_eq!(ahead_of(&[7, 3, 9], 3), [7]);
        assert!(ahead_of(&[3, 9], 3).is_empty());
        assert!(ahead_of(&[7, 9], 3).is_empty());
    }
}
