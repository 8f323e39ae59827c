//! Generates the gRPC code of the demo services from `proto/social.proto`.
//!
//! protoc comes from `protoc-bin-vendored`, so building needs no system protobuf installation (CI
//! images and developer machines differ; a pinned binary keeps the generated code the same everywhere).

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC; setting it here only affects this build script's process.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/social.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/social.proto"], &["proto"])?;
    Ok(())
}
