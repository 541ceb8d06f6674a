//! The decoder's key/value cache for one conversation.
//!
//! The standard-ONNX decoder takes `past_key_values.*` and returns `present.*` = past followed by
//! the new positions. The cache holds the `present` values ONNX Runtime allocated and hands them
//! back as the next step's inputs by reference: nothing of the cache passes through host code.
use half::f16;
use ort::session::SessionOutputs;
use ort::value::{DynValue, Tensor};

use crate::error::{Error, Result};
use crate::manifest::{DType, ModelDims};

/// Per-layer keys and values of one conversation, and how many positions they hold.
pub struct KvCache {
    /// `[key_0, value_0, key_1, value_1, ...]`.
    values: Vec<DynValue>,
    input_names: Vec<String>,
    output_names: Vec<String>,
    len: usize,
}

impl KvCache {
    /// An empty cache (zero positions) for a model of `dims`.
    pub fn new(dims: &ModelDims) -> Result<Self> {
        let shape = [1usize, dims.num_kv_heads, 0, dims.head_dim];
        let mut values = Vec::with_capacity(2 * dims.num_layers);
        let mut input_names = Vec::with_capacity(2 * dims.num_layers);
        let mut output_names = Vec::with_capacity(2 * dims.num_layers);
        for layer in 0..dims.num_layers {
            for part in ["key", "value"] {
                let empty = match dims.kv_dtype {
                    DType::F16 => Tensor::<f16>::from_array((shape, Vec::<f16>::new()))?.into_dyn(),
                    DType::F32 => Tensor::<f32>::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
                    DType::I64 => return Err(Error::Request("the manifest gives the KV cache an integer type".into())),
                };
                values.push(empty);
                input_names.push(format!("past_key_values.{layer}.{part}"));
                output_names.push(format!("present.{layer}.{part}"));
            }
        }
        Ok(Self { values, input_names, output_names, len: 0 })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `(input name, value)` pairs to feed the decoder.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, &DynValue)> {
        self.input_names.iter().map(String::as_str).zip(&self.values)
    }

    /// Takes the `present.*` outputs of a step that added `added` positions.
    pub fn update(&mut self, outputs: &mut SessionOutputs<'_>, added: usize) -> Result<()> {
        for (slot, name) in self.values.iter_mut().zip(&self.output_names) {
            *slot = outputs
                .remove(name.as_str())
                .ok_or_else(|| Error::Request(format!("decoder output {name} is missing")))?;
        }
        self.len += added;
        Ok(())
    }
}
