//! Compiles the demo and interop protos with protox (pure Rust, no `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "grpc/testing/empty.proto",
        "grpc/testing/messages.proto",
        "grpc/testing/test.proto",
        "demo/llm/v1/generator.proto",
    ];
    println!(
        "cargo:rerun-if-changed={}",
        proto_root.join("grpc").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        proto_root.join("demo").display()
    );
    for file in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }

    let fds = protox::compile(files, [&proto_root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
