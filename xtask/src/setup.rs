//! Installs what a fresh machine lacks, idempotently, saying what it does.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::step;

/// Dated nightly for the eBPF crate; keep in step with agent/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-09-01";
const BPF_LINKER_VERSION: &str = "0.10.4";

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

fn exec(program: &str, args: &[&str]) -> anyhow::Result<()> {
    step(&format!("{program} {}", args.join(" ")));
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed", args.join(" "));
    }
    Ok(())
}

fn install_missing() -> anyhow::Result<()> {
    // rustup itself must not update (a fresh RUSTUP_HOME would try).
    let _ = Command::new("rustup")
        .args(["set", "auto-self-update", "disable"])
        .output();

    let toolchains = output("rustup", &["toolchain", "list"]);
    if !toolchains.contains(EBPF_TOOLCHAIN) {
        step(&format!(
            "installing the eBPF toolchain {EBPF_TOOLCHAIN} (with rust-src)"
        ));
        exec(
            "rustup",
            &[
                "toolchain",
                "install",
                EBPF_TOOLCHAIN,
                "--profile",
                "minimal",
                "-c",
                "rust-src",
            ],
        )?;
    } else {
        let components = output(
            "rustup",
            &[
                "component",
                "list",
                "--installed",
                "--toolchain",
                EBPF_TOOLCHAIN,
            ],
        );
        if !components.contains("rust-src") {
            exec(
                "rustup",
                &[
                    "component",
                    "add",
                    "rust-src",
                    "--toolchain",
                    EBPF_TOOLCHAIN,
                ],
            )?;
        }
    }

    let linker = output("bpf-linker", &["--version"]);
    if !linker.contains(BPF_LINKER_VERSION) {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} (links with rustc's own LLVM; about a minute)"
        ));
        exec(
            "cargo",
            &[
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
            ],
        )?;
    }

    let mut packages = Vec::new();
    if !succeeds("bpftool", &["version"]) {
        packages.push("bpftool");
    }
    if !succeeds("ip", &["-V"]) {
        packages.push("iproute2");
    }
    if !succeeds("setpriv", &["--version"]) {
        packages.push("util-linux");
    }
    // Debian's curl, a real client in the L7 and admin tests.
    if !succeeds("curl", &["--version"]) {
        packages.push("curl");
    }
    // `kubectl kustomize`, which the manifest tests check deploy/ against.
    if !succeeds("kubectl", &["version", "--client"]) {
        packages.push("kubernetes-client");
    }
    // h2load, the load generator of `cargo xtask bench http`.
    if !succeeds("h2load", &["--version"]) {
        packages.push("nghttp2-client");
    }
    // dnsmasq (a resolver the pods ask) and dig (a client that asks over
    // UDP and TCP), real DNS software for the DNS capture tests.
    if !succeeds("dnsmasq", &["--version"]) {
        packages.push("dnsmasq-base");
    }
    if !succeeds("dig", &["-v"]) {
        packages.push("bind9-dnsutils");
    }
    // The load generators and servers of `cargo xtask bench rows`: wrk,
    // iperf3 (client and server) and nginx, run inside the pods.
    if !output_any("wrk", &["--version"]).contains("wrk") {
        packages.push("wrk");
    }
    if !succeeds("iperf3", &["--version"]) {
        packages.push("iperf3");
    }
    if !succeeds("/usr/sbin/nginx", &["-v"]) {
        packages.push("nginx-light");
    }
    if !packages.is_empty() {
        step(&format!("installing {} from Debian", packages.join(", ")));
        exec("apt-get", &["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&packages);
        // Packages with a service (nginx) must not start it on the host:
        // the benchmark runs its own in the pods.
        let _no_services =
            NoServiceStarts::install(packages.contains(&"nginx-light").then_some("nginx.service"))?;
        exec("apt-get", &args)?;
    }
    Ok(())
}

/// Both streams of `program args`, whatever its exit status (`wrk
/// --version` prints its version and exits 1).
fn output_any(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|output| {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            text
        })
        .unwrap_or_default()
}

/// Debian's `policy-rc.d` denying every service start while packages are
/// installed (as container images have it), when the machine has none;
/// removed again when dropped. Services installed then are also disabled,
/// so that a reboot does not start them either.
struct NoServiceStarts {
    created: bool,
    /// The service installed, to disable.
    service: Option<&'static str>,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStarts {
    fn install(service: Option<&'static str>) -> anyhow::Result<NoServiceStarts> {
        if std::path::Path::new(POLICY_RC_D).exists() {
            return Ok(NoServiceStarts {
                created: false,
                service,
            });
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask setup: no service starts while installing\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(NoServiceStarts {
            created: true,
            service,
        })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
        // Not started, and not at the next boot either (no systemd: no
        // boot-time start to turn off).
        if let Some(service) = self.service {
            let _ = Command::new("systemctl")
                .args(["disable", "--quiet", service])
                .output();
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    install_missing().context("setting up the machine")
}
