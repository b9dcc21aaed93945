//! The README's promise, checked: on a machine with only stable Rust and
//! rustup, `cargo xtask setup` builds and installs everything, and the agent
//! then builds. Run in a Rust home of its own (`RUSTUP_HOME`/`CARGO_HOME`
//! under a scratch directory) holding only the stable toolchain, on a fresh
//! clone of this repository, with a PATH that hides this machine's own
//! cargo bin directory, so nothing installed here earlier can stand in for
//! a missing install step. System packages (apt) are not removed: those
//! stay as installed on this machine.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::step;

/// The rustup proxies a Rust home's bin directory holds.
const PROXIES: [&str; 7] = [
    "cargo",
    "rustc",
    "rustdoc",
    "rustfmt",
    "cargo-clippy",
    "cargo-fmt",
    "clippy-driver",
];

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    step(what);
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("bootstrap check: `{what}` failed ({status})");
    }
    step(&format!("{what}: {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// `rustup` itself: the binary behind this machine's proxies.
fn rustup_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("rustup"))
        .find(|candidate| candidate.is_file())
        .context("rustup is not on PATH; the bootstrap check starts from it")
}

/// What the scratch home needs: the stable toolchain, the dated nightly with
/// `rust-src`, bpf-linker built from source and a check build of the agent
/// came to about 4 GB; the rest is headroom.
const NEEDED_BYTES: u64 = 6 << 30;

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs writes only into the struct it is given.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", dir.display()));
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Bytes the files under `dir` take on disk (`du -s`).
fn disk_usage(dir: &Path) -> u64 {
    Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(dir)
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

pub fn check(repo: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let temp = std::env::temp_dir();
    let free = free_bytes(&temp)?;
    if free < NEEDED_BYTES {
        bail!(
            "bootstrap check: {} has {:.1} GB free and the scratch Rust home needs about {:.0} GB; \
             free some space (e.g. `cargo clean` in old checkouts) or point TMPDIR at a larger disk",
            temp.display(),
            free as f64 / 1e9,
            NEEDED_BYTES as f64 / 1e9
        );
    }
    let scratch =
        Scratch(std::env::temp_dir().join(format!("weir-bootstrap-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    let rustup_home = scratch.0.join("rustup");
    let cargo_home = scratch.0.join("cargo");
    let bin = cargo_home.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&rustup_home)?;
    let rustup = bin.join("rustup");
    std::fs::copy(rustup_binary()?, &rustup).context("copying rustup")?;
    for proxy in PROXIES {
        std::os::unix::fs::symlink("rustup", bin.join(proxy))?;
    }
    // This machine's PATH without any Rust home's bin directory.
    let system_path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(bin.clone())
        .chain(std::env::split_paths(&system_path).filter(|dir| !dir.join("rustup").exists()));
    let path = std::env::join_paths(dirs)?;
    let source = scratch.0.join("weir");
    let env = |command: &mut Command| {
        command
            .env_clear()
            .env("PATH", &path)
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("RUSTUP_HOME", &rustup_home)
            .env("CARGO_HOME", &cargo_home)
            .env("TMPDIR", std::env::temp_dir());
    };

    let mut install = Command::new(&rustup);
    install.args([
        "toolchain",
        "install",
        "stable",
        "--profile",
        "minimal",
        "--no-self-update",
    ]);
    env(&mut install);
    run(
        &mut install,
        "a Rust home with only stable: rustup toolchain install stable",
    )?;
    let mut clone = Command::new("git");
    clone
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(repo)
        .arg(&source);
    run(&mut clone, "git clone of this repository")?;

    // The README's bootstrap, word for word.
    let mut setup = Command::new(bin.join("cargo"));
    setup.args(["xtask", "setup"]).current_dir(&source);
    env(&mut setup);
    setup.env("RUSTUP_AUTO_INSTALL", "1");
    run(&mut setup, "RUSTUP_AUTO_INSTALL=1 cargo xtask setup")?;

    // What setup installed is enough to build the eBPF programs: checking
    // the agent runs its build script, which compiles them.
    let mut build = Command::new(bin.join("cargo"));
    build
        .args(["check", "--quiet", "-p", "weir-agent"])
        .current_dir(&source);
    env(&mut build);
    run(
        &mut build,
        "cargo check -p weir-agent (builds the eBPF programs)",
    )?;
    step(&format!(
        "bootstrap from stable Rust only: {:.0} s, {:.1} GB on disk",
        started.elapsed().as_secs_f64(),
        disk_usage(&scratch.0) as f64 / 1e9
    ));
    Ok(())
}
