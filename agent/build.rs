//! Builds the eBPF programs (ebpf/weir-ebpf) for the BPF target with the pinned
//! nightly and bpf-linker, and leaves the object in OUT_DIR for `include_bytes`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Dated nightly for the eBPF crate (needs `-Z build-std` and `rust-src`).
/// Keep in step with xtask's EBPF_TOOLCHAIN.
const EBPF_TOOLCHAIN: &str = "nightly-2026-09-01";

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    build_ebpf()
}

/// gRPC code for the `.proto` files in proto/ (protox: no protoc needed).
fn compile_protos() -> anyhow::Result<()> {
    let protos = [
        "istio/v1/auth/ca.proto",
        "envoy/service/discovery/v3/discovery.proto",
        "istio/workload/workload.proto",
        "istio/security/authorization.proto",
    ];
    let files = protox::compile(protos, ["../proto"]).context("compiling proto/")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(files)
        .context("generating gRPC code")?;
    println!("cargo:rerun-if-changed=../proto");
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "weir-ebpf")
        .ok_or_else(|| anyhow!("weir-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("weir-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask setup` installs the toolchain \
         (nightly + rust-src) and bpf-linker they need",
    )
}
