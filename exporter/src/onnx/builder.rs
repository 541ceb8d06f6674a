//! A small builder for ONNX graphs: nodes by op name, constants inline, weights streamed to
//! the external data file as soon as they are added.
use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use vl_runtime::manifest::{DType, Dim, TensorSpec};

use super::QuantParams;
use super::external::{Extent, ExternalData};
use super::proto::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_proto::DataType,
    tensor_shape_proto, type_proto,
};
use crate::error::{Error, Result};

/// IR version matching opset 17.
const IR_VERSION: i64 = 8;

/// A node attribute.
pub enum Attr {
    /// One integer.
    Int(i64),
    /// A list of integers.
    Ints(Vec<i64>),
    /// One float.
    Float(f32),
}

/// Inputs and outputs of a graph, as the manifest records them.
pub type IoSpec = TensorSpec;

/// How weights of linear layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// In the activation type.
    Float,
    /// Block-quantized along the input axis for `MatMulNBits` (ONNX Runtime contrib).
    Blocks {
        /// 4 or 8.
        bits: u8,
        /// Weights per block (a power of two, at least 16).
        block: usize,
        /// One zero point per block (`MatMulNBits`' `zero_points` input), rather than the
        /// implicit 2^(bits-1) of symmetric codes.
        zero_points: bool,
    },
    /// W8A8 in explicit QDQ form (standard ONNX): the input goes through
    /// `QuantizeLinear`/`DequantizeLinear` with its calibrated per-tensor scale, the weight is
    /// int8 per output channel behind `DequantizeLinear(axis = 1)`.
    Int8Qdq {
        /// Activation codes uint8 with zero point 128 rather than int8 with zero point 0: the
        /// same quantization grid, shifted. int8 is what TensorRT's explicit quantization
        /// takes; uint8 is what ONNX Runtime's x86 integer kernels run fast (signed
        /// activations take a slow path there unless the CPU has AVX-VNNI-INT8).
        unsigned_act: bool,
    },
}

/// Numeric choices of one graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numerics {
    /// Element type of activations inside the graph (F32 or F16).
    pub act: DType,
    /// Storage of linear weights.
    pub weights: WeightFormat,
}

impl Numerics {
    /// fp32 throughout.
    pub const FP32: Numerics = Numerics { act: DType::F32, weights: WeightFormat::Float };
}

/// The ONNX Runtime contrib operator domain.
pub const MS_DOMAIN: &str = "com.microsoft";

/// Builds one graph; weights go to `data` as they are added.
pub struct GraphBuilder {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    specs_in: Vec<IoSpec>,
    specs_out: Vec<IoSpec>,
    data: ExternalData,
    counter: usize,
    scope: String,
    progress: Option<indicatif::ProgressBar>,
    numerics: Numerics,
    uses_ms_domain: bool,
    quant: Option<Arc<QuantParams>>,
    taps: Option<Taps>,
    qdq: HashMap<(String, u32), String>,
    skeleton: bool,
}

/// A linear layer's input recorded as an extra graph output, for calibration.
#[derive(Debug, Clone)]
pub struct Tap {
    /// The graph output (`calib/<first consumer's weight name>`): the tensor itself.
    pub output: String,
    /// The graph output `calib_amax/<first consumer's weight name>`: the largest magnitude of
    /// each channel `[channels]` (a run can ask for these alone, without the whole tensors).
    pub amax_output: String,
    /// The tensor inside the graph.
    pub tensor: String,
    /// Weight names of the linears that read it.
    pub consumers: Vec<String>,
    /// Channels (its last axis).
    pub channels: usize,
    /// Where a SmoothQuant division of its channels can be folded, if anywhere.
    pub source: Option<SmoothSource>,
}

/// What produces a tensor channel by channel, so that dividing its channel `j` by `s_j` can
/// be folded into a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmoothSource {
    /// The output of an RMSNorm (directly, or through a per-position slice): the norm's
    /// weight (named here) is divided.
    Norm(String),
    /// Proportional to output channel `j` of a linear (`silu(gate) * up` to `up`'s): that
    /// linear's weight rows (named here) and bias are divided.
    Rows(String),
}

#[derive(Default)]
struct Taps {
    list: Vec<Tap>,
    by_tensor: HashMap<String, usize>,
    source_of: HashMap<String, SmoothSource>,
}

fn dtype_code(dtype: DType) -> i32 {
    match dtype {
        DType::F32 => DataType::Float as i32,
        DType::F16 => DataType::Float16 as i32,
        DType::I64 => DataType::Int64 as i32,
    }
}

fn value_info(spec: &IoSpec) -> ValueInfoProto {
    let dim = spec
        .shape
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n),
                Dim::Symbolic(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(spec.name.clone()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype_code(spec.dtype)),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn attribute(name: &str, attr: Attr) -> AttributeProto {
    let mut a = AttributeProto { name: Some(name.to_string()), ..Default::default() };
    match attr {
        Attr::Int(i) => {
            a.r#type = Some(AttributeType::Int as i32);
            a.i = Some(i);
        }
        Attr::Ints(v) => {
            a.r#type = Some(AttributeType::Ints as i32);
            a.ints = v;
        }
        Attr::Float(f) => {
            a.r#type = Some(AttributeType::Float as i32);
            a.f = Some(f);
        }
    }
    a
}

/// A tensor with its bytes inline (for small constants).
pub fn inline_tensor(name: &str, dtype: DType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        data_type: Some(dtype_code(dtype)),
        dims: dims.to_vec(),
        raw_data: Some(raw),
        ..Default::default()
    }
}

impl GraphBuilder {
    /// A new graph whose weights go to `data`.
    pub fn new(name: &str, data: ExternalData) -> Self {
        Self {
            name: name.to_string(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            specs_in: Vec::new(),
            specs_out: Vec::new(),
            data,
            counter: 0,
            scope: String::new(),
            progress: None,
            numerics: Numerics::FP32,
            uses_ms_domain: false,
            quant: None,
            taps: None,
            qdq: HashMap::new(),
            skeleton: false,
        }
    }

    /// Builds the graph's structure alone from now on: no weight is computed or written (every
    /// weight counts as already written, and its reference points nowhere). Node and tensor
    /// names are those of the real graph, so its taps name the real graph's tensors without
    /// the model's weights being read (streamed calibration runs other graphs, block by block).
    pub fn set_skeleton(&mut self) {
        self.skeleton = true;
    }

    /// Sets the SmoothQuant factors and activation scales the graph code looks up.
    pub fn set_quant(&mut self, params: Arc<QuantParams>) {
        self.quant = Some(params);
    }

    /// The SmoothQuant factors and activation scales in force, if any.
    pub fn quant(&self) -> Option<Arc<QuantParams>> {
        self.quant.clone()
    }

    /// Records the input of every linear layer as an extra graph output from now on (the
    /// calibration variant of a graph). Node names are unaffected, so tensor names match the
    /// graph built without taps.
    pub fn enable_taps(&mut self) {
        self.taps = Some(Taps::default());
    }

    /// Records `tensor` (with `channels` on its last axis) as read by the linear whose weight
    /// is `consumer` (a no-op unless taps are enabled).
    pub fn tap(&mut self, tensor: &str, consumer: &str, channels: usize) {
        let Some(taps) = &mut self.taps else { return };
        if let Some(&i) = taps.by_tensor.get(tensor) {
            taps.list[i].consumers.push(consumer.to_string());
            return;
        }
        // Nodes and constants are named after the tap, not by the counter, so the graph's own
        // tensor names stay those of the graph built without taps.
        let output = format!("calib/{consumer}");
        let amax_output = format!("calib_amax/{consumer}");
        let shape = format!("{amax_output}/shape");
        let raw = [-1i64, channels as i64].iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(inline_tensor(&shape, DType::I64, &[2], raw));
        let node = |op: &str, inputs: &[&str], out: &str, attrs: Vec<(&str, Attr)>| NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            name: Some(out.to_string()),
            op_type: Some(op.into()),
            attribute: attrs.into_iter().map(|(n, a)| attribute(n, a)).collect(),
            ..Default::default()
        };
        let (rows, abs) = (format!("{amax_output}/rows"), format!("{amax_output}/abs"));
        self.nodes.push(node("Identity", &[tensor], &output, vec![]));
        self.nodes.push(node("Reshape", &[tensor, &shape], &rows, vec![]));
        self.nodes.push(node("Abs", &[&rows], &abs, vec![]));
        self.nodes.push(node(
            "ReduceMax",
            &[&abs],
            &amax_output,
            vec![("axes", Attr::Ints(vec![0])), ("keepdims", Attr::Int(0))],
        ));
        for name in [&output, &amax_output] {
            self.outputs.push(ValueInfoProto {
                name: Some(name.clone()),
                r#type: Some(TypeProto {
                    value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                        elem_type: Some(DataType::Float as i32),
                        shape: None,
                    })),
                    denotation: None,
                }),
                ..Default::default()
            });
        }
        taps.by_tensor.insert(tensor.to_string(), taps.list.len());
        taps.list.push(Tap {
            output,
            amax_output,
            tensor: tensor.to_string(),
            consumers: vec![consumer.to_string()],
            channels,
            source: taps.source_of.get(tensor).cloned(),
        });
    }

    /// Notes that `tensor` is the output of the RMSNorm whose weight is `norm_weight`, or the
    /// same channels as such an output (a no-op unless taps are enabled).
    pub fn note_norm_output(&mut self, tensor: &str, norm_weight: &str) {
        if let Some(taps) = &mut self.taps {
            taps.source_of.insert(tensor.to_string(), SmoothSource::Norm(norm_weight.to_string()));
        }
    }

    /// Notes that channel `j` of `tensor` is proportional to output channel `j` of the linear
    /// whose weight is `weight` (a no-op unless taps are enabled).
    pub fn note_row_scaled(&mut self, tensor: &str, weight: &str) {
        if let Some(taps) = &mut self.taps {
            taps.source_of.insert(tensor.to_string(), SmoothSource::Rows(weight.to_string()));
        }
    }

    /// Notes that `tensor` has the channels of `source` position by position (a slice of
    /// positions), so a norm output stays one through it.
    pub fn note_same_channels(&mut self, tensor: &str, source: &str) {
        if let Some(taps) = &mut self.taps
            && let Some(s) = taps.source_of.get(source).cloned()
        {
            taps.source_of.insert(tensor.to_string(), s);
        }
    }

    /// `DequantizeLinear(QuantizeLinear(x))` with per-tensor `scale`: int8 codes with zero
    /// point 0, or uint8 codes with zero point 128 (the same grid) when the numerics say so.
    /// One pair per tensor and scale: linears that share an input share its pair.
    pub fn fake_quant_int8(&mut self, x: &str, scale: f32) -> String {
        let key = (x.to_string(), scale.to_bits());
        if let Some(out) = self.qdq.get(&key) {
            return out.clone();
        }
        let s = self.const_f32(&[scale], &[]);
        let zp = match self.numerics.weights {
            WeightFormat::Int8Qdq { unsigned_act: true } => {
                let name = self.fresh("const");
                self.initializers.push(TensorProto {
                    name: Some(name.clone()),
                    data_type: Some(DataType::Uint8 as i32),
                    dims: vec![],
                    raw_data: Some(vec![128]),
                    ..Default::default()
                });
                name
            }
            _ => self.const_i8(&[0], &[]),
        };
        let q = self.op("QuantizeLinear", &[x, &s, &zp], vec![]);
        let dq = self.op("DequantizeLinear", &[&q, &s, &zp], vec![]);
        self.qdq.insert(key, dq.clone());
        dq
    }

    /// The calibrated activation scale of the linear whose weight is `weight`.
    pub fn act_scale(&self, weight: &str) -> Result<f32> {
        self.quant.as_ref().and_then(|q| q.act_scales.get(weight).copied()).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no activation scale for {weight} in the calibration table (recalibrate: the table does not \
                 match this checkpoint)",
                self.name
            ))
        })
    }

    /// Sets the numeric choices for the nodes added from now on.
    pub fn set_numerics(&mut self, numerics: Numerics) {
        self.numerics = numerics;
    }

    /// The numeric choices in force.
    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// Reports written weight bytes to `bar`.
    pub fn set_progress(&mut self, bar: indicatif::ProgressBar) {
        self.progress = Some(bar);
    }

    /// Sets the prefix of generated node names (for readable graphs).
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = scope.to_string();
    }

    /// Declares a graph input and returns its name.
    pub fn input(&mut self, spec: IoSpec) -> String {
        self.inputs.push(value_info(&spec));
        let name = spec.name.clone();
        self.specs_in.push(spec);
        name
    }

    /// Declares `value` as a graph output named `spec.name`.
    ///
    /// The producing node's output is renamed rather than copied through an `Identity`: an
    /// `Identity` on a KV-cache output would copy the whole cache on every decode step.
    /// Values that are graph inputs, initializers or already outputs still go through one.
    pub fn output(&mut self, value: &str, spec: IoSpec) {
        let produced_here = self.nodes.iter().any(|n| n.output.iter().any(|o| o == value));
        let taken = self.specs_out.iter().any(|o| o.name == value) || self.specs_in.iter().any(|i| i.name == value);
        if value != spec.name && produced_here && !taken {
            for node in &mut self.nodes {
                for name in node.input.iter_mut().chain(node.output.iter_mut()) {
                    if name == value {
                        *name = spec.name.clone();
                    }
                }
            }
        } else if value != spec.name {
            self.node_named("Identity", &[value], vec![], &spec.name);
        }
        self.outputs.push(value_info(&spec));
        self.specs_out.push(spec);
    }

    fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        if self.scope.is_empty() {
            format!("{op}_{}", self.counter)
        } else {
            format!("{}/{op}_{}", self.scope, self.counter)
        }
    }

    fn node_named(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, out: &str) {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            name: Some(name),
            op_type: Some(op.to_string()),
            attribute: attrs.into_iter().map(|(n, a)| attribute(n, a)).collect(),
            ..Default::default()
        });
    }

    /// Adds a node with one output and returns that output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(op);
        self.node_named(op, inputs, attrs, &out);
        out
    }

    /// Adds an ONNX Runtime contrib (`com.microsoft`) node with one output.
    pub fn ms_op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.op(op, inputs, attrs);
        if let Some(node) = self.nodes.last_mut() {
            node.domain = Some(MS_DOMAIN.to_string());
        }
        self.uses_ms_domain = true;
        out
    }

    /// Adds an ONNX Runtime contrib node (`com.microsoft`) with `n` outputs.
    pub fn ms_op_n(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, n: usize) -> Vec<String> {
        let outs = self.op_n(op, inputs, attrs, n);
        if let Some(node) = self.nodes.last_mut() {
            node.domain = Some(MS_DOMAIN.to_string());
        }
        self.uses_ms_domain = true;
        outs
    }

    /// Adds a node with `n` outputs.
    pub fn op_n(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, n: usize) -> Vec<String> {
        let base = self.fresh(op);
        let outputs: Vec<String> = (0..n).map(|i| format!("{base}:{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: Some(base),
            op_type: Some(op.to_string()),
            attribute: attrs.into_iter().map(|(n, a)| attribute(n, a)).collect(),
            ..Default::default()
        });
        outputs
    }

    /// A small int64 constant, stored inline.
    pub fn const_i64(&mut self, values: &[i64], dims: &[i64]) -> String {
        let name = self.fresh("const");
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(inline_tensor(&name, DType::I64, dims, raw));
        name
    }

    /// A small int8 constant, stored inline.
    pub fn const_i8(&mut self, values: &[i8], dims: &[i64]) -> String {
        let name = self.fresh("const");
        let raw = values.iter().map(|v| v.to_le_bytes()[0]).collect();
        self.initializers.push(TensorProto {
            name: Some(name.clone()),
            data_type: Some(DataType::Int8 as i32),
            dims: dims.to_vec(),
            raw_data: Some(raw),
            ..Default::default()
        });
        name
    }

    /// A small float constant, stored inline.
    pub fn const_f32(&mut self, values: &[f32], dims: &[i64]) -> String {
        let name = self.fresh("const");
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(inline_tensor(&name, DType::F32, dims, raw));
        name
    }

    /// A small constant in the activation type (f16 values are rounded from `values`).
    pub fn const_act(&mut self, values: &[f32], dims: &[i64]) -> String {
        if self.numerics.act != DType::F16 {
            return self.const_f32(values, dims);
        }
        let name = self.fresh("const");
        let raw = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        self.initializers.push(inline_tensor(&name, DType::F16, dims, raw));
        name
    }

    /// A weight: its bytes are appended to the external data file now.
    pub fn weight(&mut self, name: &str, dtype: DType, dims: &[i64], bytes: &[u8]) -> Result<String> {
        self.weight_raw(name, dtype_code(dtype), dims, bytes)
    }

    /// A uint8 weight (packed quantized blocks).
    pub fn weight_u8(&mut self, name: &str, dims: &[i64], bytes: &[u8]) -> Result<String> {
        self.weight_raw(name, DataType::Uint8 as i32, dims, bytes)
    }

    /// An int8 weight (quantized codes).
    pub fn weight_i8(&mut self, name: &str, dims: &[i64], codes: &[i8]) -> Result<String> {
        self.weight_raw(name, DataType::Int8 as i32, dims, bytemuck::cast_slice(codes))
    }

    /// A float weight stored in the activation type.
    pub fn weight_act(&mut self, name: &str, dims: &[i64], values: &[f32]) -> Result<String> {
        if self.numerics.act == DType::F16 {
            let bytes: Vec<u8> = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
            return self.weight(name, DType::F16, dims, &bytes);
        }
        self.weight_f32(name, dims, values)
    }

    fn weight_raw(&mut self, name: &str, data_type: i32, dims: &[i64], bytes: &[u8]) -> Result<String> {
        if self.skeleton {
            return Ok(self.push_external(name, data_type, dims, Extent { offset: 0, length: 0 }));
        }
        let fresh = !self.data.holds(name);
        let extent = self.data.tensor(name, data_type, dims, bytes)?;
        if let Some(bar) = self.progress.as_ref().filter(|_| fresh) {
            bar.inc(extent.length);
        }
        Ok(self.push_external(name, data_type, dims, extent))
    }

    /// Whether an earlier graph sharing this data file wrote weight `name`: [`Self::reuse`] then
    /// references it without computing its bytes again.
    pub fn holds(&self, name: &str) -> bool {
        self.skeleton || self.data.holds(name)
    }

    /// References weight `name`, which an earlier graph sharing this data file wrote with this
    /// element type and shape.
    pub fn reuse(&mut self, name: &str, dtype: DType, dims: &[i64]) -> Result<String> {
        self.reuse_raw(name, dtype_code(dtype), dims)
    }

    /// [`Self::reuse`] for packed uint8 blocks.
    pub fn reuse_u8(&mut self, name: &str, dims: &[i64]) -> Result<String> {
        self.reuse_raw(name, DataType::Uint8 as i32, dims)
    }

    /// [`Self::reuse`] for int8 codes.
    pub fn reuse_i8(&mut self, name: &str, dims: &[i64]) -> Result<String> {
        self.reuse_raw(name, DataType::Int8 as i32, dims)
    }

    /// [`Self::reuse`] for a weight in the activation type.
    pub fn reuse_act(&mut self, name: &str, dims: &[i64]) -> Result<String> {
        self.reuse(name, self.numerics.act, dims)
    }

    fn reuse_raw(&mut self, name: &str, data_type: i32, dims: &[i64]) -> Result<String> {
        if self.skeleton {
            return Ok(self.push_external(name, data_type, dims, Extent { offset: 0, length: 0 }));
        }
        let written = self
            .data
            .written(name, data_type, dims)?
            .ok_or_else(|| Error::Invalid(format!("weight {name} was never written to {}", self.data.file_name())))?;
        Ok(self.push_external(name, data_type, dims, written.extent))
    }

    fn push_external(&mut self, name: &str, data_type: i32, dims: &[i64], extent: Extent) -> String {
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        self.initializers.push(TensorProto {
            name: Some(name.to_string()),
            data_type: Some(data_type),
            dims: dims.to_vec(),
            data_location: Some(proto::tensor_proto::DataLocation::External as i32),
            external_data: vec![
                entry("location", self.data.file_name().to_string()),
                entry("offset", extent.offset.to_string()),
                entry("length", extent.length.to_string()),
            ],
            ..Default::default()
        });
        name.to_string()
    }

    /// A float32 weight.
    pub fn weight_f32(&mut self, name: &str, dims: &[i64], values: &[f32]) -> Result<String> {
        self.weight(name, DType::F32, dims, bytemuck::cast_slice(values))
    }

    /// Finishes the graph: the model's bytes, its interface, and the data file's size and hash.
    pub fn finish(self, producer_version: &str) -> Result<FinishedGraph> {
        let (graph, data) = self.finish_sharing(producer_version);
        let (data_bytes, data_sha256) = data.finish()?;
        Ok(FinishedGraph { data_bytes, data_sha256, ..graph })
    }

    /// Finishes the graph but not its data file, which the next graph built on it shares (its
    /// size and hash are left empty here: they are known when the last graph finishes it).
    pub fn finish_sharing(self, producer_version: &str) -> (FinishedGraph, ExternalData) {
        let mut opset_import = vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(super::OPSET) }];
        if self.uses_ms_domain {
            opset_import.push(OperatorSetIdProto { domain: Some(MS_DOMAIN.into()), version: Some(1) });
        }
        let model = ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import,
            producer_name: Some("vl-export".into()),
            producer_version: Some(producer_version.to_string()),
            graph: Some(GraphProto {
                name: Some(self.name),
                node: self.nodes,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        };
        let graph = FinishedGraph {
            model_bytes: model.encode_to_vec(),
            inputs: self.specs_in,
            outputs: self.specs_out,
            data_bytes: 0,
            data_sha256: String::new(),
            taps: self.taps.map(|t| t.list).unwrap_or_default(),
        };
        (graph, self.data)
    }
}

/// A serialized graph and what the manifest needs to say about it.
pub struct FinishedGraph {
    /// The `.onnx` file's bytes (weights excluded).
    pub model_bytes: Vec<u8>,
    /// Graph inputs.
    pub inputs: Vec<IoSpec>,
    /// Graph outputs.
    pub outputs: Vec<IoSpec>,
    /// Size of the external data file.
    pub data_bytes: u64,
    /// SHA-256 of the external data file.
    pub data_sha256: String,
    /// The linear inputs recorded as extra outputs (calibration graphs only).
    pub taps: Vec<Tap>,
}
