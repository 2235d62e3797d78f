//! Compiles `ordervault/v1/*.proto` with protox (pure Rust), so building the
//! workspace needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ordervault/v1/vault.proto"];
    let fds = protox::compile(protos, ["."])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection.
    let descriptor_path = out_dir.join("ordervault_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        protox::prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        // Generated messages that can carry a value get a hand-written,
        // redacting Debug in src/lib.rs instead of the derived one.
        .skip_debug([
            ".ordervault.v1.Field",
            ".ordervault.v1.Consignee",
            ".ordervault.v1.LineItem",
            ".ordervault.v1.RevealedField",
            ".ordervault.v1.LeakedRecord",
            ".ordervault.v1.CreatePrincipalResponse",
        ])
        // Decode errors become INVALID_ARGUMENT, not tonic's default INTERNAL.
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(fds)?;

    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
