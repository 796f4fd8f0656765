fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from a vendored crate so a fresh machine needs no protobuf-compiler package.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_protos(
        &["proto/cairn/metadata.proto", "proto/cairn/data.proto"],
        &["proto"],
    )?;
    Ok(())
}
