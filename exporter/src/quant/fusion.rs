//! Whether ONNX Runtime runs a QDQ graph with its integer kernels: the graph is optimized as
//! the runtime's sessions optimize it, saved, and its operators counted. A linear whose
//! `DequantizeLinear → MatMul` is still there after optimization runs in fp32 on dequantized
//! values (correct, but with none of int8's speed).
use std::collections::BTreeMap;
use std::path::Path;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use prost::Message;

use crate::error::{Error, Result};
use crate::onnx::proto::ModelProto;

/// The session option that lets ONNX Runtime's QDQ fusions take int8 (signed) activations on
/// x86, where it otherwise fuses only uint8 ones (the integer kernels handle both); the
/// runtime's sessions set it.
pub use vl_runtime::graph::QDQ_INT8_ALLOWED;

/// Operators of one optimized graph.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FusionReport {
    /// Count per operator type of the optimized graph.
    pub ops: BTreeMap<String, usize>,
    /// Integer matmuls (`MatMulIntegerToFloat`, `QLinearMatMul`, `MatMulInteger`).
    pub integer_matmuls: usize,
    /// `MatMul` (or `Gemm`) nodes still fed by a `DequantizeLinear`: linears left unfused.
    pub dequantized_matmuls: usize,
}

/// Optimizes the graph `onnx` (Level 3, CPU, `int8_allowed` as [`QDQ_INT8_ALLOWED`]), saves
/// the result under `scratch` and counts its operators.
pub fn fusion_report(onnx: &Path, scratch: &Path, int8_allowed: bool) -> Result<FusionReport> {
    let ort_err = |e: ort::Error| Error::Runtime(e.into());
    let out = scratch.join("optimized.onnx");
    let env = vl_runtime::ort_env::environment()?;
    let builder_err = |e: ort::Error<ort::session::builder::SessionBuilder>| ort_err(e.into());
    let mut builder = Session::builder(env)
        .map_err(ort_err)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(builder_err)?
        .with_config_entry(QDQ_INT8_ALLOWED, if int8_allowed { "1" } else { "0" })
        .map_err(builder_err)?
        .with_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        .map_err(builder_err)?
        .with_optimized_model_path(&out)
        .map_err(builder_err)?;
    drop(builder.commit_from_file(onnx).map_err(ort_err)?);
    let bytes = std::fs::read(&out).map_err(|e| Error::io(&out, e))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Invalid(format!("{}: not an ONNX model: {e}", out.display())))?;
    let graph = model.graph.unwrap_or_default();
    let mut report = FusionReport::default();
    let dq_outputs: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .filter(|n| n.op_type() == "DequantizeLinear")
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    for n in &graph.node {
        *report.ops.entry(n.op_type().to_string()).or_default() += 1;
        match n.op_type() {
            "MatMulIntegerToFloat" | "QLinearMatMul" | "MatMulInteger" => report.integer_matmuls += 1,
            "MatMul" | "Gemm" if n.input.iter().any(|i| dq_outputs.contains(i.as_str())) => {
                report.dequantized_matmuls += 1
            }
            _ => {}
        }
    }
    Ok(report)
}
