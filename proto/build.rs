//! Compiles `dssgd/v1/dssgd.proto` with protox, a pure-Rust protobuf
//! compiler, so building needs no `protoc` on the machine. It also writes
//! the encoded file descriptor set, which the server's reflection service
//! publishes, and compiles the benchmarks' `dssgd/bench/v1/baseline.proto`.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "dssgd/v1/dssgd.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("dssgd_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // The payloads of a slice decode as `bytes::Bytes` views of the
    // received buffer instead of copies, which matters for dense transfers
    // of several MiB.
    tonic_prost_build::configure()
        .bytes(".dssgd.v1.SparseSlice")
        .codec_path("crate::codec::ReservingCodec")
        .compile_fds(descriptors)?;

    // The benchmarks' reference services, kept out of the descriptor set
    // that the server publishes.
    let baseline = "dssgd/bench/v1/baseline.proto";
    println!("cargo:rerun-if-changed={baseline}");
    tonic_prost_build::configure().compile_fds(protox::compile([baseline], ["."])?)?;
    Ok(())
}
