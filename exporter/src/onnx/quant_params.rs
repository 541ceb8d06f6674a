//! What the graph builder reads to build a smoothed or int8 graph; `quant` computes it.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::error::Result;
use crate::weight_codes::blocks::{BlockShape, QuantizedBlocks};

/// Quantized blocks made ahead of the graph (GPTQ's, by `quant`), read by weight name.
pub trait BlockCodes: std::fmt::Debug + Send + Sync {
    /// The codes of `weight`, which must have shape `shape`.
    fn read(&self, weight: &str, shape: BlockShape) -> Result<QuantizedBlocks>;
}

/// What the graph code looks up, by checkpoint tensor name, to build a smoothed or int8 graph.
#[derive(Debug, Default, Clone)]
pub struct QuantParams {
    /// Per-tensor activation scale of each linear's input, by the linear's weight name.
    pub act_scales: HashMap<String, f32>,
    /// SmoothQuant factors multiplied into a linear's weight columns, by its weight name.
    pub column_factors: HashMap<String, Arc<[f32]>>,
    /// SmoothQuant factors dividing a norm's weight, by the norm's weight name.
    pub norm_divisors: HashMap<String, Arc<[f32]>>,
    /// SmoothQuant factors dividing a linear's weight rows and bias, by its weight name.
    pub row_divisors: HashMap<String, Arc<[f32]>>,
    /// Linears kept in float in an int8 graph, by weight name.
    pub float_linears: HashSet<String>,
    /// GPTQ's codes of a weight-only graph's linears.
    pub block_codes: Option<Arc<dyn BlockCodes>>,
}
