//! After a whole test run: nothing of the tests' may be left on the machine.
//! Every test node is named `wt<pid>x<n>`; its network namespaces, cgroups
//! and pins must all be gone, and the run's own temporary directory (its
//! `TMPDIR`) empty. The empty parents the harness shares between nodes (and
//! between test binaries) are removed here, once no test runs any more.
use std::path::{Path, PathBuf};

use anyhow::bail;

/// The names in `dir`; with `only_dirs`, only its subdirectories (a cgroup's
/// files are the kernel's interface, not anything a test left).
fn entries(dir: &Path, only_dirs: bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| !only_dirs || entry.path().is_dir())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    })
}

/// The `TMPDIR` of one test run: created empty, checked empty afterwards.
pub fn scratch() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("weir-test-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub fn check(scratch: &Path) -> anyhow::Result<()> {
    let mut left = Vec::new();
    let test_node = |name: &str| name.starts_with("wt");
    for name in entries(Path::new("/run/netns"), false) {
        if test_node(&name) {
            left.push(format!("network namespace /run/netns/{name}"));
        }
    }
    // Parents shared by every node: removed when empty, listed otherwise.
    let mut parents = vec![
        (scratch.join("weir-tests"), false),
        (PathBuf::from("/sys/fs/bpf/weir"), false),
    ];
    if let Some(root) = cgroup2_root() {
        parents.push((root.join("weir-tests"), true));
    }
    for (parent, only_dirs) in parents {
        let names = entries(&parent, only_dirs);
        for name in &names {
            if test_node(name) || !parent.ends_with("weir") {
                left.push(parent.join(name).display().to_string());
            }
        }
        if names.is_empty() && parent.exists() {
            let _ = std::fs::remove_dir(&parent);
        }
    }
    for name in entries(scratch, false) {
        if name != "weir-tests" {
            left.push(scratch.join(name).display().to_string());
        }
    }
    if left.is_empty() {
        let _ = std::fs::remove_dir_all(scratch);
    } else {
        bail!(
            "the test run left these behind (a test's cleanup is missing or failed):\n  {}",
            left.join("\n  ")
        );
    }
    crate::step(
        "nothing of the tests' is left: namespaces, cgroups, pins and scratch files are gone",
    );
    Ok(())
}
