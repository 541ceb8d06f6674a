//! Compiles the official `onnx.proto` (copied from the `onnx` Python package, Apache-2.0) and
//! SentencePiece's `sentencepiece_model.proto` into Rust types with prost, using protox so that
//! no `protoc` binary is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    println!("cargo:rerun-if-changed=proto/sentencepiece_model.proto");
    let fds = protox::compile(["proto/onnx.proto", "proto/sentencepiece_model.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
