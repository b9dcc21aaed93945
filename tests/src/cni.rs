//! A CNI stand-in: foreign eBPF programs that behave like a CNI's on the
//! hooks Weir shares, loaded and attached the way another agent would (its
//! own bpf links, no BPF_F_PREORDER), so that Weir's place next to them is
//! tested. Written as raw instructions: they are a few lines each and must
//! not come from Weir's own eBPF crate.
//!
//! - [`ForeignProgram::service_balancer4`]/`6`: a `cgroup/connect4`/`6`
//!   socket load balancer (Cilium's socket LB, kube-proxy replacement):
//!   a connect to `vip:port` is rewritten to one backend.
//! - [`ForeignProgram::tcx_pass`]: a tcx ingress program that returns
//!   `TCX_PASS` for every packet (a CNI's policy program that allows it),
//!   which ends the interface's chain there.
//! - [`add_clsact_filter`]: a clsact qdisc with a classic-BPF ingress
//!   filter at priority 7 (a CNI's tc filter at another priority).
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;

/// uapi `enum bpf_cmd`, `enum bpf_prog_type`, `enum bpf_attach_type`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
/// uapi `BPF_F_BEFORE`.
const BPF_F_BEFORE: u32 = 1 << 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

/// `struct bpf_sock_addr` offsets.
const USER_IP4: i16 = 4;
const USER_IP6: i16 = 8;
const USER_PORT: i16 = 24;

/// One eBPF instruction.
#[derive(Clone, Copy)]
struct Insn(u64);

impl Insn {
    fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn(
            u64::from(code)
                | (u64::from(dst & 0xf) << 8)
                | (u64::from(src & 0xf) << 12)
                | (u64::from(off as u16) << 16)
                | (u64::from(imm as u32) << 32),
        )
    }
    /// `dst = *(u32 *)(src + off)`
    fn load_word(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x61, dst, src, off, 0)
    }
    /// `*(u32 *)(dst + off) = src`
    fn store_word(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x63, dst, src, off, 0)
    }
    /// `dst = imm` (32-bit move)
    fn mov32(dst: u8, imm: u32) -> Insn {
        Insn::new(0xb4, dst, 0, 0, imm as i32)
    }
    /// `if (u32)dst != imm goto +off`
    fn jne32(dst: u8, imm: u32, off: i16) -> Insn {
        Insn::new(0x56, dst, 0, off, imm as i32)
    }
    fn exit() -> Insn {
        Insn::new(0x95, 0, 0, 0, 0)
    }
    /// `call helper`
    fn call(helper: i32) -> Insn {
        Insn::new(0x85, 0, 0, 0, helper)
    }
    /// `dst &= imm` (32-bit)
    fn and32(dst: u8, imm: u32) -> Insn {
        Insn::new(0x54, dst, 0, 0, imm as i32)
    }
}

/// A 4-byte field of `bpf_sock_addr` as the program reads it: the bytes
/// are in network order, the load is little-endian.
fn word(bytes: [u8; 4]) -> u32 {
    u32::from_le_bytes(bytes)
}

/// `user_port`: the port in network order in the low 16 bits.
fn port_word(port: u16) -> u32 {
    let [high, low] = port.to_be_bytes();
    word([high, low, 0, 0])
}

/// "If every field matches, rewrite them to these values; allow the
/// connect either way": `matches` and `rewrites` are (offset, value).
fn rewrite_program(matches: &[(i16, u32)], rewrites: &[(i16, u32)]) -> Vec<Insn> {
    let mut program = Vec::new();
    // The rewrite takes two instructions per field; the jump skips the
    // rest of the compares, the rewrites and lands on `r0 = 1`.
    let rewrite_len = rewrites.len() * 2;
    for (index, (offset, value)) in matches.iter().enumerate() {
        let remaining_compares = (matches.len() - index - 1) * 2;
        program.push(Insn::load_word(2, 1, *offset));
        program.push(Insn::jne32(
            2,
            *value,
            (remaining_compares + rewrite_len) as i16,
        ));
    }
    for (offset, value) in rewrites {
        program.push(Insn::mov32(2, *value));
        program.push(Insn::store_word(1, 2, *offset));
    }
    program.push(Insn::mov32(0, 1));
    program.push(Insn::exit());
    program
}

/// A loaded foreign program.
pub struct ForeignProgram {
    fd: OwnedFd,
    attach_type: u32,
    pub name: &'static str,
}

/// A foreign program attached to a cgroup; detached when dropped.
pub struct ForeignLink {
    _fd: OwnedFd,
}

/// A foreign program attached to a cgroup the old way (`BPF_PROG_ATTACH`
/// without `BPF_F_ALLOW_MULTI`), as older agents did; detached when
/// dropped (such an attachment outlives its descriptors).
pub struct ExclusiveAttachment {
    cgroup: std::fs::File,
    program: OwnedFd,
    attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`/`BPF_PROG_DETACH`.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    rest: [u64; 3],
}

impl Drop for ExclusiveAttachment {
    fn drop(&mut self) {
        let mut attr = ProgAttach {
            target_fd: self.cgroup.as_raw_fd() as u32,
            attach_bpf_fd: self.program.as_raw_fd() as u32,
            attach_type: self.attach_type,
            attach_flags: 0,
            rest: [0; 3],
        };
        let _ = bpf_call(BPF_PROG_DETACH, &mut attr);
    }
}

impl ForeignProgram {
    /// `cgroup/connect4`: `vip:port` becomes `backend`.
    pub fn service_balancer4(
        vip: Ipv4Addr,
        port: u16,
        backend: SocketAddrV4,
    ) -> anyhow::Result<ForeignProgram> {
        let program = rewrite_program(
            &[(USER_IP4, word(vip.octets())), (USER_PORT, port_word(port))],
            &[
                (USER_IP4, word(backend.ip().octets())),
                (USER_PORT, port_word(backend.port())),
            ],
        );
        ForeignProgram::load("cni_sock_lb4", &program, BPF_CGROUP_INET4_CONNECT)
    }

    /// `cgroup/connect6`: `[vip]:port` becomes `backend`.
    pub fn service_balancer6(
        vip: Ipv6Addr,
        port: u16,
        backend: SocketAddrV6,
    ) -> anyhow::Result<ForeignProgram> {
        let words = |ip: &Ipv6Addr| {
            let octets = ip.octets();
            (0..4).map(move |i| {
                (
                    USER_IP6 + 4 * i as i16,
                    word([
                        octets[4 * i],
                        octets[4 * i + 1],
                        octets[4 * i + 2],
                        octets[4 * i + 3],
                    ]),
                )
            })
        };
        let mut matches: Vec<(i16, u32)> = words(&vip).collect();
        matches.push((USER_PORT, port_word(port)));
        let mut rewrites: Vec<(i16, u32)> = words(backend.ip()).collect();
        rewrites.push((USER_PORT, port_word(backend.port())));
        let program = rewrite_program(&matches, &rewrites);
        ForeignProgram::load("cni_sock_lb6", &program, BPF_CGROUP_INET6_CONNECT)
    }

    /// tcx ingress: `TCX_PASS` (0) for everything.
    pub fn tcx_pass() -> anyhow::Result<ForeignProgram> {
        ForeignProgram::load_typed(
            "cni_tcx_pass",
            BPF_PROG_TYPE_SCHED_CLS,
            &[Insn::mov32(0, 0), Insn::exit()],
            BPF_TCX_INGRESS,
        )
    }

    /// tcx ingress: drops a random one in `mask + 1` packets (`mask` a
    /// power of two minus one), `TCX_NEXT` for the rest: a lossy link, so
    /// that TCP retransmits.
    pub fn tcx_lossy(mask: u32) -> anyhow::Result<ForeignProgram> {
        const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
        const TC_ACT_SHOT: u32 = 2;
        ForeignProgram::load_typed(
            "cni_tcx_lossy",
            BPF_PROG_TYPE_SCHED_CLS,
            &[
                Insn::call(BPF_FUNC_GET_PRANDOM_U32),
                Insn::and32(0, mask),
                Insn::jne32(0, 0, 2),
                Insn::mov32(0, TC_ACT_SHOT),
                Insn::exit(),
                // TCX_NEXT (-1).
                Insn::mov32(0, u32::MAX),
                Insn::exit(),
            ],
            BPF_TCX_INGRESS,
        )
    }

    fn load(
        name: &'static str,
        program: &[Insn],
        attach_type: u32,
    ) -> anyhow::Result<ForeignProgram> {
        ForeignProgram::load_typed(name, BPF_PROG_TYPE_CGROUP_SOCK_ADDR, program, attach_type)
    }

    fn load_typed(
        name: &'static str,
        prog_type: u32,
        program: &[Insn],
        attach_type: u32,
    ) -> anyhow::Result<ForeignProgram> {
        let instructions: Vec<u64> = program.iter().map(|insn| insn.0).collect();
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut prog_name = [0u8; 16];
        prog_name[..name.len()].copy_from_slice(name.as_bytes());
        /// The `prog_load` prefix of `union bpf_attr`.
        #[repr(C)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
        }
        let mut attr = ProgLoad {
            prog_type,
            insn_cnt: instructions.len() as u32,
            insns: instructions.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            // Only cgroup programs are checked against it at load.
            expected_attach_type: if prog_type == BPF_PROG_TYPE_SCHED_CLS {
                0
            } else {
                attach_type
            },
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr).map_err(|error| {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            anyhow::anyhow!(
                "loading the stand-in {name}: {error}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        })?;
        Ok(ForeignProgram {
            fd,
            attach_type,
            name,
        })
    }

    /// Attaches it to `cgroup` as another agent would: a bpf link, in
    /// attach order (no flags).
    pub fn attach(&self, cgroup: &Path) -> anyhow::Result<ForeignLink> {
        let directory = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        self.link(directory.as_raw_fd() as u32, 0)
            .with_context(|| format!("attaching {} to {}", self.name, cgroup.display()))
    }

    /// Attaches it to `cgroup` ahead of everything there, Weir's
    /// preorder programs included (`BPF_F_PREORDER | BPF_F_BEFORE`, no
    /// relative program): how a program could get in front of Weir's.
    pub fn attach_ahead(&self, cgroup: &Path) -> anyhow::Result<ForeignLink> {
        const BPF_F_PREORDER: u32 = 0x40;
        let directory = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        self.link(directory.as_raw_fd() as u32, BPF_F_PREORDER | BPF_F_BEFORE)
            .with_context(|| format!("attaching {} ahead on {}", self.name, cgroup.display()))
    }

    /// Attaches it to `cgroup` without `BPF_F_ALLOW_MULTI` (flags 0): the
    /// only program on that hook there.
    pub fn attach_exclusive(&self, cgroup: &Path) -> anyhow::Result<ExclusiveAttachment> {
        let directory = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let program = self.fd.try_clone()?;
        let mut attr = ProgAttach {
            target_fd: directory.as_raw_fd() as u32,
            attach_bpf_fd: program.as_raw_fd() as u32,
            attach_type: self.attach_type,
            attach_flags: 0,
            rest: [0; 3],
        };
        // BPF_PROG_ATTACH returns 0, not a descriptor.
        bpf_call(BPF_PROG_ATTACH, &mut attr)
            .with_context(|| format!("attaching {} to {}", self.name, cgroup.display()))?;
        Ok(ExclusiveAttachment {
            cgroup: directory,
            program,
            attach_type: self.attach_type,
        })
    }

    /// Attaches a tcx program to `interface` inside `pod`'s namespace, last
    /// in its chain (a tcx link with no flags).
    pub fn attach_tcx(&self, pod: &crate::Pod, interface: &str) -> anyhow::Result<ForeignLink> {
        self.attach_tcx_with(pod, interface, 0)
    }

    /// The same, first in the chain (`BPF_F_BEFORE` with no relative
    /// program), ahead of whatever is there.
    pub fn attach_tcx_first(
        &self,
        pod: &crate::Pod,
        interface: &str,
    ) -> anyhow::Result<ForeignLink> {
        self.attach_tcx_with(pod, interface, BPF_F_BEFORE)
    }

    fn attach_tcx_with(
        &self,
        pod: &crate::Pod,
        interface: &str,
        flags: u32,
    ) -> anyhow::Result<ForeignLink> {
        let netns = std::fs::File::open(pod.netns_path())?;
        let interface = std::ffi::CString::new(interface)?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: this thread alone moves into the namespace.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        anyhow::bail!("setns: {}", io::Error::last_os_error());
                    }
                    // SAFETY: a NUL-terminated name.
                    let ifindex = unsafe { libc::if_nametoindex(interface.as_ptr()) };
                    anyhow::ensure!(ifindex != 0, "{interface:?}: no such interface");
                    self.link(ifindex, flags)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))?
        })
        .with_context(|| format!("attaching {} in {}", self.name, pod.name))
    }

    /// `BPF_LINK_CREATE` to a cgroup descriptor or an ifindex (tcx).
    fn link(&self, target: u32, flags: u32) -> anyhow::Result<ForeignLink> {
        #[repr(C)]
        struct LinkCreate {
            prog_fd: u32,
            target: u32,
            attach_type: u32,
            flags: u32,
            rest: [u64; 2],
        }
        let mut attr = LinkCreate {
            prog_fd: self.fd.as_raw_fd() as u32,
            target,
            attach_type: self.attach_type,
            flags,
            rest: [0; 2],
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        Ok(ForeignLink { _fd: fd })
    }
}

/// `bpf(command, attr)`: its non-negative result.
fn bpf_call<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for
    // `command`, passed with its size.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result)
}

/// A `bpf` command that returns a new descriptor.
fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf_call(command, attr)?;
    // SAFETY: a descriptor the kernel just created for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A CNI's tc filter on `pod`'s `eth0`: a clsact qdisc and, at ingress
/// priority 7, a classic BPF filter that classifies nothing.
pub fn add_clsact_filter(pod: &crate::Pod) -> anyhow::Result<()> {
    let tc = |args: &[&str]| {
        let mut all = vec!["-n", pod.netns.as_str()];
        all.extend_from_slice(args);
        crate::node::run("tc", &all)
    };
    tc(&["qdisc", "add", "dev", "eth0", "clsact"])?;
    tc(&[
        "filter",
        "add",
        "dev",
        "eth0",
        "ingress",
        "prio",
        "7",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ])?;
    Ok(())
}
