//! Compiles `proto/` with protox (no system `protoc`).
//!
//! Two outputs land in `OUT_DIR`: the prost/tonic code, and the encoded
//! descriptor set *with* extension options (`google.api.http`), which the REST
//! gateway and gRPC reflection read at run time.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(["uploadhook/v1/webhook.proto"])?;

    fs::write(
        out.join("uploadhook_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
