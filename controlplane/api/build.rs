//! Compiles the protobuf API with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/weft/v1/mesh.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // shared, reference-counted bytes: cloning a snapshot for another proxy copies nothing
        .bytes(".weft.v1.Snapshot.service_list")
        .compile_fds(fds)?;
    Ok(())
}
