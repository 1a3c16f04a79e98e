//! Generates the REAPI and ByteStream types and services from the vendored official protos.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes with the build (protoc-bin-vendored), so a fresh machine needs no package
    // for it and the README's two commands stay two.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let mut config = prost_build_config();
    config.protoc_executable(protoc);
    // Blob contents as `Bytes`: a blob read from storage goes out without another copy.
    config.bytes(["."]);
    let protos = [
        std::path::PathBuf::from("third_party/build/bazel/remote/execution/v2/remote_execution.proto"),
        std::path::PathBuf::from("third_party/google/bytestream/bytestream.proto"),
    ];
    tonic_prost_build::configure().build_server(true).build_client(true).compile_with_config(
        config,
        &protos,
        &[std::path::PathBuf::from("third_party"), well_known],
    )?;
    println!("cargo:rerun-if-changed=third_party");
    Ok(())
}

fn prost_build_config() -> tonic_prost_build::Config {
    tonic_prost_build::Config::new()
}
