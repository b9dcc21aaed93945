//! Cgroup attachments in a chosen place in the chain.
//!
//! Weir's socket-address hooks must see what the application dialled (a
//! service VIP), also when a CNI's socket load balancer on the same cgroup
//! was attached first and would rewrite the VIP to a backend. Since Linux
//! 6.15 `BPF_F_PREORDER` runs a program ahead of every program attached
//! without it, whatever the attach order, and never moves or detaches the
//! others. aya's cgroup attach takes no flags, so this makes aya's one
//! `BPF_LINK_CREATE` call with that flag, and pins the link itself.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// Run ahead of the programs attached without it (uapi `BPF_F_PREORDER`).
pub const BPF_F_PREORDER: u32 = 1 << 6;

/// uapi `enum bpf_cmd`.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// The `link_create` member of `union bpf_attr` for a cgroup target.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    /// `relative_fd`/`relative_id` and `expected_revision`: unused.
    relative: u32,
    _pad: u32,
    expected_revision: u64,
}

/// The `obj_pin` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for
    // `command`, and its size is passed; the kernel zero-extends the rest.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Attaches `program` to `cgroup` for `attach_type` (uapi
/// `enum bpf_attach_type`) as a bpf link with `flags`. The link stays
/// attached while its descriptor or a pin of it lives.
pub fn link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags,
        ..LinkCreateAttr::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the bpf object `fd` at `path` (on bpffs).
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..ObjPinAttr::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}
