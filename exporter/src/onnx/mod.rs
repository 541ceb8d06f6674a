//! ONNX protobuf types (generated from the official `onnx.proto` at build time, without `protoc`),
//! a small graph builder, and the external-data writer.

#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

mod builder;
mod external;
mod quant_params;
pub mod tensorrt_check;

pub use builder::{
    Attr, FinishedGraph, GraphBuilder, IoSpec, MS_DOMAIN, Numerics, SmoothSource, Tap, WeightFormat, inline_tensor,
};
pub use external::ExternalData;
pub use quant_params::{BlockCodes, QuantParams};

/// The opset of the default (TensorRT-parsable) target. 17 is the first with
/// `LayerNormalization`; it keeps `ReduceMean` axes as an attribute, which TensorRT 8.6+ and 10 parse.
pub const OPSET: i64 = 17;
