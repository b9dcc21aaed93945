//! Builds the eBPF programs (ebpf/weir-ebpf) for the BPF target with the pinned
//! nightly and bpf-linker, and leaves the object in OUT_DIR for `include_bytes`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Dated nightly for the eBPF crate (needs `-Z build-std` and `rust-src`).
/// Keep in step with xtask's EBPF_TOOLCHAIN.
const EBPF_TOOLCHAIN: &str = "nightly-2026-09-01";

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    envoy_descriptors()?;
    build_ebpf()
}

/// Envoy's message types that Weir reads from its config file as proto3
/// JSON/YAML (routing/schema.rs), as one `FileDescriptorSet` in OUT_DIR.
/// The `.proto` files are envoy-types' own (the ones its prost types were
/// generated from), so the descriptors and the Rust types agree field for
/// field. Istio's metadata-exchange filter config comes from proto/.
fn envoy_descriptors() -> anyhow::Result<()> {
    use prost::Message as _;
    let metadata = cargo_metadata::MetadataCommand::new()
        .exec()
        .context("cargo metadata")?;
    let envoy_types = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "envoy-types")
        .ok_or_else(|| anyhow!("envoy-types package not found"))?;
    let root = envoy_types
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("envoy-types manifest has no parent directory"))?
        .join("proto");
    let includes = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec",
        "opentelemetry-proto",
        "client_model",
    ]
    .map(|dir| root.join(dir).into_std_path_buf());
    // Every message a route, cluster or endpoint resource names, and the
    // `Any` payloads istiod puts in them.
    let files = [
        "envoy/config/route/v3/route.proto",
        "envoy/config/cluster/v3/cluster.proto",
        "envoy/config/endpoint/v3/endpoint.proto",
        "envoy/extensions/filters/http/fault/v3/fault.proto",
        "envoy/extensions/filters/http/cors/v3/cors.proto",
        "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
        "envoy/extensions/transport_sockets/tls/v3/tls.proto",
        "envoy/extensions/transport_sockets/raw_buffer/v3/raw_buffer.proto",
        "envoy/extensions/transport_sockets/internal_upstream/v3/internal_upstream.proto",
        "envoy/extensions/retry/host/previous_hosts/v3/previous_hosts.proto",
        "envoy/extensions/filters/http/stateful_session/v3/stateful_session.proto",
        // Read only to be refused by name rather than as an unknown @type.
        "envoy/extensions/filters/http/csrf/v3/csrf.proto",
        "envoy/extensions/filters/http/lua/v3/lua.proto",
        "envoy/extensions/transport_sockets/quic/v3/quic_transport.proto",
        "envoy/extensions/transport_sockets/proxy_protocol/v3/upstream_proxy_protocol.proto",
        "envoy/extensions/retry/priority/previous_priorities/v3/previous_priorities_config.proto",
        "envoy/extensions/http/stateful_session/cookie/v3/cookie.proto",
        "envoy/extensions/http/stateful_session/header/v3/header.proto",
        "istio/envoy/metadata_exchange.proto",
        "udpa/type/v1/typed_struct.proto",
        "xds/type/v3/typed_struct.proto",
    ];
    let mut paths = includes.to_vec();
    paths.push("../proto".into());
    let set = protox::compile(files, paths).context("compiling Envoy's .proto files")?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?)
        .join("envoy_descriptors.bin");
    std::fs::write(&out, set.encode_to_vec()).with_context(|| format!("writing {out:?}"))?;
    Ok(())
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
