//! What the agent needs from the machine, checked before anything is touched:
//! privileges, cgroup v2, BTF, bpffs. Each failure is one line naming what is
//! missing and what to do.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing capabilities {0}: run the agent as root, or grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN (and CAP_PERFMON)"
    )]
    Capabilities(String),
    #[error(
        "no cgroup v2 hierarchy in /proc/mounts: mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or boot with systemd.unified_cgroup_hierarchy"
    )]
    NoCgroup2,
    #[error(
        "no cgroup v2 hierarchy in /proc/mounts: `ip netns exec {0}` remounted /sys, hiding the host's cgroup and bpf mounts; enter only the network namespace instead: `nsenter --net=/run/netns/{0} weir run …`"
    )]
    NoCgroup2UnderIpNetnsExec(String),
    #[error(
        "kernel BTF not found at /sys/kernel/btf/vmlinux: use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error("bpffs is not mounted at {path} and mounting it failed ({source}): run `mount -t bpf bpf {path}`", path = .path.display())]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path}: {source}", path = .path.display())]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cgroup {path}: {programs} on {hook} is attached without BPF_F_ALLOW_MULTI, so the kernel would stop running it for the pods under {pods_parent} once Weir attaches there (or refuse Weir): have its owner attach it with BPF_F_ALLOW_MULTI or as a bpf link, or set cgroup.pods_parent elsewhere",
        path = .path.display(),
        pods_parent = .pods_parent.display()
    )]
    ExclusiveProgram {
        path: PathBuf,
        programs: String,
        hook: &'static str,
        pods_parent: PathBuf,
    },
}

/// Programs attached without `BPF_F_ALLOW_MULTI` on Weir's hooks, on the
/// pods' parent cgroup or above it (up to `root`): the kernel skips such a
/// program for a cgroup below it that has programs of its own, so Weir's
/// attach would silently switch off another agent's program for the pods
/// (a CNI's socket balancer, say), or be refused. Refused here, by name.
pub fn check_cgroup_neighbours(root: &Path, pods_parent: &Path) -> Result<(), PreflightError> {
    let mut cgroup = Some(pods_parent);
    while let Some(path) = cgroup {
        let directory = std::fs::File::open(path).map_err(|source| PreflightError::Cgroup {
            path: path.to_path_buf(),
            source,
        })?;
        for (attach_type, hook) in super::chain::CGROUP_HOOKS {
            let Ok((programs, multi)) = super::chain::cgroup_programs(&directory, attach_type)
            else {
                // A kernel without this hook: the datapath load says so.
                continue;
            };
            if !programs.is_empty() && !multi {
                return Err(PreflightError::ExclusiveProgram {
                    path: path.to_path_buf(),
                    programs: super::chain::describe(&programs),
                    hook,
                    pods_parent: pods_parent.to_path_buf(),
                });
            }
        }
        cgroup = (path != root).then(|| path.parent()).flatten();
    }
    Ok(())
}

/// Capability numbers from linux/capability.h.
const REQUIRED_CAPS: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

/// Checks the effective capabilities of this process.
pub fn check_capabilities() -> Result<(), PreflightError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = REQUIRED_CAPS
        .iter()
        .filter(|(bit, _)| effective & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities(missing.join(", ")))
    }
}

pub fn check_btf() -> Result<(), PreflightError> {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf)
    }
}

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> Result<PathBuf, PreflightError> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    cgroup2_root_in(&mounts).ok_or_else(no_cgroup2)
}

/// No cgroup v2 mount is visible. The usual reason is `ip netns exec`, which
/// mounts a sysfs named after the namespace on /sys.
fn no_cgroup2() -> PreflightError {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    match ip_netns_exec_name(&mountinfo) {
        Some(name) => PreflightError::NoCgroup2UnderIpNetnsExec(name),
        None => PreflightError::NoCgroup2,
    }
}

/// The namespace name `ip netns exec NAME` leaves as the source of the sysfs
/// it mounts on /sys (a plain sysfs mount's source is `sysfs` or `none`).
fn ip_netns_exec_name(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mount_point = mount.split_whitespace().nth(4)?;
        let mut fs = fs.split_whitespace();
        let (fstype, source) = (fs.next()?, fs.next()?);
        (mount_point == "/sys"
            && fstype == "sysfs"
            && source != "sysfs"
            && source != "none"
            && Path::new("/run/netns").join(source).exists())
        .then(|| source.to_string())
    })
}

fn cgroup2_root_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    })
}

/// Resolves a configured cgroup path: relative paths are under the v2 root.
pub fn resolve_cgroup(root: &Path, configured: &Path) -> PathBuf {
    if configured.is_absolute() {
        configured.to_path_buf()
    } else {
        root.join(configured)
    }
}

/// The cgroup this process runs in, under the v2 root (`0::<path>` in
/// `/proc/self/cgroup`).
pub fn own_cgroup(root: &Path) -> Result<PathBuf, PreflightError> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(no_cgroup2)?;
    Ok(root.join(relative.trim_start_matches('/')))
}

/// Creates `dir` if needed and moves this whole process into it. Must run
/// before the agent creates any socket: a socket's cgroup is fixed at creation.
pub fn enter_cgroup(dir: &Path) -> Result<(), PreflightError> {
    let error = |source| PreflightError::Cgroup {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(error)?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).map_err(error)
}

/// Mounts bpffs at `path` unless it is mounted already.
pub fn ensure_bpffs(path: &Path) -> Result<(), PreflightError> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let target = fields.nth(1);
        let fstype = fields.next();
        target == Some(&*path.to_string_lossy()) && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    let error = |source| PreflightError::Bpffs {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(error)?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| error(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: plain mount(2) call with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(error(std::io::Error::last_os_error()))
    }
}

/// Raises the soft limit on open descriptors to the hard limit, as ztunnel
/// does: a node proxy holds two descriptors per relayed connection, and the
/// usual soft limit of 1,024 would cap a node at a few hundred. Returns the
/// limit in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit the call fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: a valid rlimit; only the soft limit changes.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_root_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_root_in("cgroup /x cgroup rw 0 0\n"), None);
    }

    #[test]
    fn relative_cgroups_are_under_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            resolve_cgroup(root, Path::new("weir")),
            PathBuf::from("/sys/fs/cgroup/weir")
        );
        assert_eq!(resolve_cgroup(root, Path::new("/x")), PathBuf::from("/x"));
    }
}
