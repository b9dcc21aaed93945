//! gRPC code for the test workloads' `.proto` files in proto/ (protox: no
//! protoc needed), as in agent/build.rs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let files = protox::compile(["echo.proto"], ["proto"]).context("compiling proto/")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(files)
        .context("generating gRPC code")?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
