//! A static check, with no GPU, that TensorRT's ONNX parser takes every node of a graph: its
//! domain, operator, element types and the restrictions of onnx-tensorrt's operator matrix
//! (kept as data in `exporter/data/tensorrt_onnx_ops.yaml`, with its source and version).
//!
//! Graphs are read without their external weights: the few constants a rule needs the values
//! of (quantization zero points and scales) are read inline, or from the bytes their external
//! data reference names, and nothing else.
//!
//! ```no_run
//! let report = vl_export::onnx::tensorrt_check::check_file("engines/small/decoder.onnx".as_ref())?;
//! for f in &report.findings {
//!     eprintln!("{f}");
//! }
//! # Ok::<(), vl_export::Error>(())
//! ```
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::OnceLock;

use prost::Message;
use serde::Deserialize;

use super::proto::{ModelProto, NodeProto, TensorProto, tensor_proto::DataType, type_proto};
use crate::error::{Error, Result};

/// The matrix as committed (onnx-tensorrt `docs/operators.md`, release 10.1 GA).
const MATRIX_YAML: &str = include_str!("../../data/tensorrt_onnx_ops.yaml");

/// A constant read for a rule larger than this is reported unreadable rather than read (zero
/// points and scales are a few kilobytes).
const MAX_CONSTANT_BYTES: u64 = 64 << 20;

/// An element type as the matrix names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TrtType {
    /// FLOAT.
    Fp32,
    /// FLOAT16.
    Fp16,
    /// BFLOAT16.
    Bf16,
    /// FLOAT8E4M3FN.
    Fp8,
    /// INT32.
    Int32,
    /// INT64.
    Int64,
    /// INT8 (a quantized type).
    Int8,
    /// INT4 (a quantized type).
    Int4,
    /// UINT8 (network inputs and outputs only).
    Uint8,
    /// BOOL.
    Bool,
}

impl TrtType {
    /// The matrix's name for ONNX element type `code`, if TensorRT has one.
    pub fn from_onnx(code: i32) -> Option<Self> {
        Some(match DataType::try_from(code).ok()? {
            DataType::Float => TrtType::Fp32,
            DataType::Float16 => TrtType::Fp16,
            DataType::Bfloat16 => TrtType::Bf16,
            DataType::Float8e4m3fn => TrtType::Fp8,
            DataType::Int32 => TrtType::Int32,
            DataType::Int64 => TrtType::Int64,
            DataType::Int8 => TrtType::Int8,
            DataType::Int4 => TrtType::Int4,
            DataType::Uint8 => TrtType::Uint8,
            DataType::Bool => TrtType::Bool,
            _ => return None,
        })
    }
}

/// A machine check enforcing a row's restrictions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Input `index` (when present) must be an initializer or a `Constant` node's output.
    ConstantInput {
        /// Input position.
        index: usize,
        /// Its name in the ONNX spec (`axes`).
        name: String,
    },
    /// The zero point (input 2), when present, is constant, all zeros, and INT8, FP8 or INT4.
    ZeroPointZero,
    /// The scale (input 1) is constant, positive, and per tensor, per channel or blocked.
    QuantizationScale,
    /// Only output 0 is read.
    FirstOutputOnly,
    /// None of these attributes is set.
    ForbiddenAttributes {
        /// Attribute names.
        names: Vec<String>,
    },
}

/// One row of the matrix.
#[derive(Debug, Clone, Deserialize)]
pub struct OpEntry {
    /// Operator type.
    pub op: String,
    /// The matrix's Y/N.
    pub supported: bool,
    /// Element types of the operator's data tensor.
    #[serde(default)]
    pub types: Vec<TrtType>,
    /// The matrix's restriction text.
    #[serde(default)]
    pub restrictions: Option<String>,
    /// The checks enforcing `restrictions`.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// The inclusive opset range of the default domain.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct OpsetRange {
    /// Lowest opset.
    pub min: i64,
    /// Highest opset.
    pub max: i64,
}

/// onnx-tensorrt's operator support matrix.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Opsets of the default domain the parser takes.
    pub opset: OpsetRange,
    /// Rows by operator type.
    pub ops: HashMap<String, OpEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatrix {
    opset: OpsetRange,
    operators: Vec<OpEntry>,
}

impl Matrix {
    /// Parses a matrix in the committed file's format.
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawMatrix =
            serde_norway::from_str(text).map_err(|e| Error::Invalid(format!("TensorRT operator matrix: {e}")))?;
        let mut ops = HashMap::new();
        for entry in raw.operators {
            if let Some(dup) = ops.insert(entry.op.clone(), entry) {
                return Err(Error::Invalid(format!("TensorRT operator matrix: {} listed twice", dup.op)));
            }
        }
        Ok(Self { opset: raw.opset, ops })
    }

    /// The committed matrix (`exporter/data/tensorrt_onnx_ops.yaml`), parsed once.
    pub fn tensorrt() -> Result<&'static Self> {
        static MATRIX: OnceLock<std::result::Result<Matrix, String>> = OnceLock::new();
        MATRIX
            .get_or_init(|| Matrix::parse(MATRIX_YAML).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Invalid(e.clone()))
    }
}

/// A rule a node (or the model) breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// The model imports the default domain at an opset outside the parser's range (0: none).
    Opset {
        /// The opset imported.
        version: i64,
    },
    /// The node is not in the default ONNX domain (ONNX Runtime's `com.microsoft` contrib
    /// operators such as `MatMulNBits` or `GroupQueryAttention` are not TensorRT operators).
    Domain {
        /// Its domain.
        domain: String,
    },
    /// The operator is not in the matrix.
    UnknownOperator,
    /// The matrix lists the operator as unsupported.
    Unsupported,
    /// A tensor's element type is not among the operator's supported types.
    ElementType {
        /// The tensor.
        tensor: String,
        /// Its ONNX element type.
        dtype: String,
    },
    /// An input the parser needs as a build-time constant is computed in the graph.
    NotConstant {
        /// The tensor.
        tensor: String,
        /// The input's name in the ONNX spec.
        input: String,
    },
    /// A quantization zero point is not all zeros (TensorRT quantizes symmetrically).
    ZeroPointNonZero {
        /// The zero-point tensor.
        tensor: String,
    },
    /// A quantization zero point (or its absence, ONNX's UINT8) is of a type other than INT8,
    /// FP8 or INT4.
    ZeroPointType {
        /// The zero-point tensor (empty: none given).
        tensor: String,
        /// Its ONNX element type.
        dtype: String,
    },
    /// A quantization scale is not a constant, so its shape and values cannot be checked.
    ScaleNotConstant {
        /// The scale tensor.
        tensor: String,
    },
    /// A quantization scale has a coefficient that is not positive (or none at all).
    ScaleNotPositive {
        /// The scale tensor.
        tensor: String,
    },
    /// Scale, zero point and input shapes fit none of the per-tensor, per-channel and blocked
    /// forms the importer takes.
    QuantizationShape {
        /// What does not fit.
        detail: String,
    },
    /// A constant a rule needs could not be read.
    Unreadable {
        /// The tensor.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// An output other than the first is read.
    ExtraOutputUsed {
        /// The output.
        output: String,
    },
    /// The operator has restrictions in the matrix that no check here encodes.
    UncheckedRestriction {
        /// The matrix's text.
        restriction: String,
    },
    /// The node sets an attribute the parser does not take.
    Attribute {
        /// The attribute.
        name: String,
    },
    /// The node holds subgraphs, which this check does not walk.
    Subgraph,
}

impl Violation {
    /// A short stable name of the rule (for lists of known exceptions).
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::Opset { .. } => "opset",
            Violation::Domain { .. } => "domain",
            Violation::UnknownOperator => "unknown-operator",
            Violation::Unsupported => "unsupported",
            Violation::ElementType { .. } => "element-type",
            Violation::NotConstant { .. } => "not-constant",
            Violation::ZeroPointNonZero { .. } => "zero-point-non-zero",
            Violation::ZeroPointType { .. } => "zero-point-type",
            Violation::ScaleNotConstant { .. } => "scale-not-constant",
            Violation::ScaleNotPositive { .. } => "scale-not-positive",
            Violation::QuantizationShape { .. } => "quantization-shape",
            Violation::Unreadable { .. } => "unreadable",
            Violation::ExtraOutputUsed { .. } => "extra-output-used",
            Violation::UncheckedRestriction { .. } => "unchecked-restriction",
            Violation::Attribute { .. } => "attribute",
            Violation::Subgraph => "subgraph",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Opset { version } => write!(f, "default-domain opset {version} is outside TensorRT's range"),
            Violation::Domain { domain } => write!(f, "domain {domain} is not the default ONNX domain"),
            Violation::UnknownOperator => write!(f, "not in TensorRT's operator matrix"),
            Violation::Unsupported => write!(f, "listed as unsupported by TensorRT"),
            Violation::ElementType { tensor, dtype } => write!(f, "{tensor} is {dtype}, not a supported type"),
            Violation::NotConstant { tensor, input } => write!(f, "`{input}` ({tensor}) must be a constant"),
            Violation::ZeroPointNonZero { tensor } => write!(f, "zero point {tensor} is not all zeros"),
            Violation::ZeroPointType { tensor, dtype } => {
                write!(f, "zero point {tensor:?} is {dtype}, not INT8/FP8/INT4")
            }
            Violation::ScaleNotConstant { tensor } => write!(f, "scale {tensor} is not a constant"),
            Violation::ScaleNotPositive { tensor } => {
                write!(f, "scale {tensor} has a coefficient that is not positive")
            }
            Violation::QuantizationShape { detail } => write!(f, "quantization shape: {detail}"),
            Violation::Unreadable { tensor, reason } => write!(f, "cannot read {tensor}: {reason}"),
            Violation::ExtraOutputUsed { output } => write!(f, "output {output} is read; only the first is supported"),
            Violation::UncheckedRestriction { restriction } => write!(f, "restriction not checked here: {restriction}"),
            Violation::Attribute { name } => write!(f, "attribute {name} is not supported"),
            Violation::Subgraph => write!(f, "holds subgraphs, which are not checked"),
        }
    }
}

/// One rule broken by one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The node's name (its first output when unnamed; empty for model-level findings).
    pub node: String,
    /// Its operator type (empty for model-level findings).
    pub op: String,
    /// The rule.
    pub violation: Violation,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.node, self.op, self.violation)
    }
}

/// What a check found, and what it covered.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The rules broken.
    pub findings: Vec<Finding>,
    /// Nodes checked, by operator type (`domain:op` outside the default domain).
    pub ops: BTreeMap<String, usize>,
    /// Nodes whose data tensor's element type is neither declared nor inferable, so its type
    /// was not checked.
    pub untyped: Vec<String>,
}

/// Checks the graph file `path` (its external data beside it, read only where a rule needs it).
pub fn check_file(path: &Path) -> Result<Report> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Invalid(format!("{}: not an ONNX model: {e}", path.display())))?;
    check_model(&model, path.parent())
}

/// Checks `model` against the committed matrix; external data is looked up under `dir`
/// (`None`: constants held externally are reported unreadable when a rule needs them).
pub fn check_model(model: &ModelProto, dir: Option<&Path>) -> Result<Report> {
    check_model_with(Matrix::tensorrt()?, model, dir)
}

/// Checks `model` against `matrix`.
pub fn check_model_with(matrix: &Matrix, model: &ModelProto, dir: Option<&Path>) -> Result<Report> {
    let mut findings = Vec::new();
    let (mut ops, mut untyped) = (BTreeMap::new(), Vec::new());
    let opset =
        model.opset_import.iter().find(|o| matches!(o.domain(), "" | "ai.onnx")).map(|o| o.version()).unwrap_or(0);
    if !(matrix.opset.min..=matrix.opset.max).contains(&opset) {
        findings.push(Finding {
            node: String::new(),
            op: String::new(),
            violation: Violation::Opset { version: opset },
        });
    }
    let Some(graph) = &model.graph else { return Ok(Report { findings, ops, untyped }) };
    let ctx = Context::new(graph, dir);
    for node in &graph.node {
        let key = match node.domain() {
            "" | "ai.onnx" => node.op_type().to_string(),
            domain => format!("{domain}:{}", node.op_type()),
        };
        *ops.entry(key).or_default() += 1;
        let mut report =
            |violation| findings.push(Finding { node: node_name(node), op: node.op_type().to_string(), violation });
        if !matches!(node.domain(), "" | "ai.onnx") {
            report(Violation::Domain { domain: node.domain().to_string() });
            continue;
        }
        if node.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
            report(Violation::Subgraph);
        }
        let Some(entry) = matrix.ops.get(node.op_type()) else {
            report(Violation::UnknownOperator);
            continue;
        };
        if !entry.supported {
            report(Violation::Unsupported);
            continue;
        }
        for tensor in typed_operands(node) {
            match ctx.types.get(tensor) {
                Some(&code) if !TrtType::from_onnx(code).is_some_and(|t| entry.types.contains(&t)) => {
                    report(Violation::ElementType { tensor: tensor.to_string(), dtype: dtype_name(code) })
                }
                Some(_) => {}
                None => untyped.push(node_name(node)),
            }
        }
        if entry.checks.is_empty()
            && let Some(r) = entry.restrictions.as_deref().filter(|r| !r.trim().is_empty())
        {
            report(Violation::UncheckedRestriction { restriction: r.to_string() });
        }
        for check in &entry.checks {
            match check {
                Check::ConstantInput { index, name } => {
                    if let Some(t) = node.input.get(*index).filter(|t| !t.is_empty())
                        && !ctx.is_constant(t)
                    {
                        report(Violation::NotConstant { tensor: t.clone(), input: name.clone() });
                    }
                }
                Check::ZeroPointZero => check_zero_point(&ctx, node, &mut report),
                Check::QuantizationScale => check_scale(&ctx, node, &mut report),
                Check::ForbiddenAttributes { names } => {
                    for a in node.attribute.iter().filter(|a| names.iter().any(|n| n == a.name())) {
                        report(Violation::Attribute { name: a.name().to_string() });
                    }
                }
                Check::FirstOutputOnly => {
                    for out in node.output.iter().skip(1).filter(|o| !o.is_empty() && ctx.read.contains(o.as_str())) {
                        report(Violation::ExtraOutputUsed { output: out.clone() });
                    }
                }
            }
        }
    }
    Ok(Report { findings, ops, untyped })
}

fn node_name(node: &NodeProto) -> String {
    match node.name() {
        "" => node.output.first().cloned().unwrap_or_default(),
        name => name.to_string(),
    }
}

fn dtype_name(code: i32) -> String {
    DataType::try_from(code).map(|d| d.as_str_name().to_string()).unwrap_or_else(|_| format!("type {code}"))
}

/// The tensors whose element type is the operator's `T` in the matrix: the data input, the
/// value input of `Where` (input 0 is its BOOL condition), both sides of a cast, and the output
/// of operators that have no data input.
fn typed_operands(node: &NodeProto) -> Vec<&str> {
    let input = |i: usize| node.input.get(i).map(String::as_str).filter(|s| !s.is_empty());
    let output = || node.output.first().map(String::as_str).filter(|s| !s.is_empty());
    match node.op_type() {
        "Where" => input(1).into_iter().collect(),
        "Cast" | "CastLike" => input(0).into_iter().chain(output()).collect(),
        "Constant" | "ConstantOfShape" | "RandomNormal" | "RandomUniform" | "EyeLike" => output().into_iter().collect(),
        _ => input(0).into_iter().collect(),
    }
}

/// What the rules look up about a graph's tensors.
struct Context<'a> {
    /// Element types: declared, or inferred node by node.
    types: HashMap<&'a str, i32>,
    /// Constant tensors: initializers and `Constant` node outputs.
    constants: HashMap<&'a str, &'a TensorProto>,
    /// Tensors read by a node or as a graph output.
    read: HashSet<&'a str>,
    /// Where external data lives.
    dir: Option<&'a Path>,
}

impl<'a> Context<'a> {
    fn new(graph: &'a super::proto::GraphProto, dir: Option<&'a Path>) -> Self {
        let mut types = HashMap::new();
        for vi in graph.input.iter().chain(&graph.output).chain(&graph.value_info) {
            if let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
                && let Some(code) = t.elem_type
            {
                types.insert(vi.name(), code);
            }
        }
        let mut constants = HashMap::new();
        for t in &graph.initializer {
            types.insert(t.name(), t.data_type());
            constants.insert(t.name(), t);
        }
        for node in &graph.node {
            if node.op_type() == "Constant"
                && matches!(node.domain(), "" | "ai.onnx")
                && let (Some(out), Some(t)) = (
                    node.output.first(),
                    node.attribute.iter().find(|a| a.name() == "value").and_then(|a| a.t.as_ref()),
                )
            {
                constants.insert(out.as_str(), t);
            }
            for (i, out) in node.output.iter().enumerate() {
                if types.contains_key(out.as_str()) || out.is_empty() {
                    continue;
                }
                if let Some(code) = infer_type(node, i, &types, &constants) {
                    types.insert(out.as_str(), code);
                }
            }
        }
        let read = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .chain(graph.output.iter().map(|o| o.name()))
            .collect();
        Self { types, constants, read, dir }
    }

    fn is_constant(&self, tensor: &str) -> bool {
        self.constants.contains_key(tensor)
    }

    /// The values of constant `tensor`, widened to f64.
    fn values(&self, tensor: &str) -> std::result::Result<Vec<f64>, String> {
        let t = self.constants.get(tensor).ok_or("not a constant")?;
        let count: usize = t.dims.iter().map(|&d| usize::try_from(d).unwrap_or(0)).product();
        let code = t.data_type();
        let raw = match (&t.raw_data, t.data_location()) {
            (_, super::proto::tensor_proto::DataLocation::External) => Some(self.external(t)?),
            (Some(raw), _) => Some(raw.clone()),
            (None, _) => None,
        };
        decode(code, count, raw.as_deref(), t)
    }

    /// Reads exactly the bytes of `t`'s external data reference.
    fn external(&self, t: &TensorProto) -> std::result::Result<Vec<u8>, String> {
        let get = |k: &str| t.external_data.iter().find(|e| e.key() == k).map(|e| e.value());
        let location = get("location").ok_or("external data without a location")?;
        let offset: u64 = get("offset").unwrap_or("0").parse().map_err(|e| format!("offset: {e}"))?;
        let length: u64 =
            get("length").ok_or("external data without a length")?.parse().map_err(|e| format!("length: {e}"))?;
        if length > MAX_CONSTANT_BYTES {
            return Err(format!("{length} bytes is more than a zero point or scale holds"));
        }
        let dir = self.dir.ok_or("held in external data, and no directory was given")?;
        let path = dir.join(location);
        let mut file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        file.seek(SeekFrom::Start(offset)).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut bytes = vec![0u8; length as usize];
        file.read_exact(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(bytes)
    }

    fn dims(&self, tensor: &str) -> Option<&'a [i64]> {
        self.constants.get(tensor).map(|t| t.dims.as_slice())
    }
}

/// The element type of output `i` of `node` from its inputs' (ONNX's type rules for the
/// operators that change type; the data input's type for the others).
fn infer_type(
    node: &NodeProto,
    i: usize,
    types: &HashMap<&str, i32>,
    consts: &HashMap<&str, &TensorProto>,
) -> Option<i32> {
    let input = |k: usize| node.input.get(k).and_then(|n| types.get(n.as_str())).copied();
    let attr = |name: &str| node.attribute.iter().find(|a| a.name() == name);
    match (node.domain(), node.op_type(), i) {
        ("" | "ai.onnx", _, _) => {}
        // ONNX Runtime's contrib operators the exporter uses: output 0 has the type of input 0.
        (super::MS_DOMAIN, "MatMulNBits" | "GroupQueryAttention", 0) => return input(0),
        _ => return None,
    }
    Some(match (node.op_type(), i) {
        ("Cast", 0) => attr("to")?.i? as i32,
        ("CastLike", 0) => input(1)?,
        ("Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin", _) | ("TopK", 1) => DataType::Int64 as i32,
        (
            "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Not" | "IsNaN"
            | "IsInf",
            _,
        ) => DataType::Bool as i32,
        ("QuantizeLinear", 0) => match input(2) {
            Some(code) => code,
            None => attr("output_dtype").and_then(|a| a.i).map(|v| v as i32).unwrap_or(DataType::Uint8 as i32),
        },
        ("DequantizeLinear", 0) => input(1)?,
        ("Constant", 0) => consts.get(node.output.first()?.as_str())?.data_type(),
        ("ConstantOfShape", 0) => {
            attr("value").and_then(|a| a.t.as_ref()).map_or(DataType::Float as i32, |t| t.data_type())
        }
        ("Where", 0) => input(1)?,
        ("LayerNormalization", 1 | 2) => {
            attr("stash_type").and_then(|a| a.i).map_or(DataType::Float as i32, |v| v as i32)
        }
        (
            "If" | "Loop" | "Scan" | "EyeLike" | "OneHot" | "RandomNormal" | "RandomUniform" | "RandomNormalLike"
            | "RandomUniformLike" | "Multinomial",
            _,
        ) => return None,
        _ => input(0)?,
    })
}

/// The values of a tensor of element type `code` from its raw bytes or typed fields.
fn decode(code: i32, count: usize, raw: Option<&[u8]>, t: &TensorProto) -> std::result::Result<Vec<f64>, String> {
    let dtype = DataType::try_from(code).map_err(|_| format!("unknown element type {code}"))?;
    let values: Vec<f64> = match (dtype, raw) {
        (DataType::Float, Some(r)) => {
            r.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        }
        (DataType::Float, None) => t.float_data.iter().map(|&v| v as f64).collect(),
        (DataType::Float16, Some(r)) => {
            r.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect()
        }
        (DataType::Bfloat16, Some(r)) => {
            r.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect()
        }
        (DataType::Float16, None) => t.int32_data.iter().map(|&v| half::f16::from_bits(v as u16).to_f64()).collect(),
        (DataType::Bfloat16, None) => t.int32_data.iter().map(|&v| half::bf16::from_bits(v as u16).to_f64()).collect(),
        (DataType::Int8, Some(r)) => r.iter().map(|&b| b as i8 as f64).collect(),
        (DataType::Uint8, Some(r)) => r.iter().map(|&b| b as f64).collect(),
        (DataType::Int8 | DataType::Uint8 | DataType::Int32, None) => t.int32_data.iter().map(|&v| v as f64).collect(),
        (DataType::Int32, Some(r)) => {
            r.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        }
        (DataType::Float8e4m3fn, Some(r)) => r.iter().map(|&b| fp8_e4m3fn(b)).collect(),
        (DataType::Float8e4m3fn, None) => t.int32_data.iter().map(|&v| fp8_e4m3fn(v as u8)).collect(),
        (DataType::Int4, r) => {
            let bytes: Vec<u8> =
                r.map(<[u8]>::to_vec).unwrap_or_else(|| t.int32_data.iter().map(|&v| v as u8).collect());
            let nibble = |n: u8| (((n & 0xf) << 4) as i8 >> 4) as f64;
            bytes.iter().flat_map(|&b| [nibble(b), nibble(b >> 4)]).take(count).collect()
        }
        _ => return Err(format!("{} constants are not read here", dtype.as_str_name())),
    };
    if values.len() != count {
        return Err(format!("{} values for {count} elements", values.len()));
    }
    Ok(values)
}

/// An FP8 E4M3FN code's value (no infinities; S.1111.111 is NaN).
fn fp8_e4m3fn(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, man) = (i32::from((b >> 3) & 0xf), f64::from(b & 0x7));
    match (exp, man) {
        (0xf, 7.0) => f64::NAN,
        (0, _) => sign * man / 8.0 * 2f64.powi(-6),
        _ => sign * (1.0 + man / 8.0) * 2f64.powi(exp - 7),
    }
}

/// `zero_point_zero`: input 2, when given, is a constant of INT8, FP8 or INT4 whose values are
/// all 0. A `QuantizeLinear` without one (and without `output_dtype`) quantizes to UINT8 in
/// ONNX, which TensorRT takes as INT8: reported as a UINT8 zero point.
fn check_zero_point(ctx: &Context<'_>, node: &NodeProto, report: &mut impl FnMut(Violation)) {
    let Some(zp) = node.input.get(2).filter(|z| !z.is_empty()) else {
        let dtype = node.attribute.iter().find(|a| a.name() == "output_dtype").and_then(|a| a.i);
        if node.op_type() == "QuantizeLinear" && dtype.is_none() {
            report(Violation::ZeroPointType { tensor: String::new(), dtype: "UINT8 (ONNX's default)".into() });
        }
        return;
    };
    if let Some(&code) = ctx.types.get(zp.as_str())
        && !matches!(TrtType::from_onnx(code), Some(TrtType::Int8 | TrtType::Fp8 | TrtType::Int4))
    {
        report(Violation::ZeroPointType { tensor: zp.clone(), dtype: dtype_name(code) });
    }
    if !ctx.is_constant(zp) {
        report(Violation::NotConstant { tensor: zp.clone(), input: "zero_point".into() });
        return;
    }
    match ctx.values(zp) {
        Ok(v) if v.iter().all(|&x| x == 0.0) => {}
        Ok(_) => report(Violation::ZeroPointNonZero { tensor: zp.clone() }),
        Err(reason) => report(Violation::Unreadable { tensor: zp.clone(), reason }),
    }
}

/// `quantization_scale`: what the importer asserts of a constant scale and its shapes.
fn check_scale(ctx: &Context<'_>, node: &NodeProto, report: &mut impl FnMut(Violation)) {
    let Some(scale) = node.input.get(1).filter(|s| !s.is_empty()) else {
        report(Violation::QuantizationShape { detail: "no scale input".into() });
        return;
    };
    if !ctx.is_constant(scale) {
        report(Violation::ScaleNotConstant { tensor: scale.clone() });
        return;
    }
    match ctx.values(scale) {
        Ok(v) if !v.is_empty() && v.iter().all(|&x| x > 0.0) => {}
        Ok(_) => report(Violation::ScaleNotPositive { tensor: scale.clone() }),
        Err(reason) => report(Violation::Unreadable { tensor: scale.clone(), reason }),
    }
    let scale_dims = ctx.dims(scale).unwrap_or_default();
    let volume = |d: &[i64]| d.iter().product::<i64>();
    let scale_size = volume(scale_dims);
    if let Some(zp) = node.input.get(2).filter(|z| !z.is_empty())
        && let Some(zp_dims) = ctx.dims(zp)
        && volume(zp_dims) != scale_size
    {
        report(Violation::QuantizationShape {
            detail: format!("zero point {zp} has {} values, scale {scale} {scale_size}", volume(zp_dims)),
        });
    }
    // The data input's shape is known when it is a constant (a weight); an activation's is not.
    let Some(input_dims) = node.input.first().and_then(|x| ctx.dims(x)) else { return };
    let rank = input_dims.len() as i64;
    let int4 = node
        .input
        .get(2)
        .and_then(|z| ctx.types.get(z.as_str()))
        .is_some_and(|&c| TrtType::from_onnx(c) == Some(TrtType::Int4));
    if int4 && input_dims.last().is_some_and(|d| d % 2 != 0) {
        report(Violation::QuantizationShape { detail: "INT4 with an odd last dimension".into() });
    }
    if scale_size == 1 {
        return;
    }
    // The importer's axis: the attribute, else the rank, which then means 0.
    let mut axis = node.attribute.iter().find(|a| a.name() == "axis").and_then(|a| a.i).unwrap_or(rank);
    if axis < 0 {
        axis += rank;
    }
    if axis == rank {
        axis = 0;
    }
    if scale_dims.len() == 1 {
        let k = usize::try_from(axis).ok().and_then(|a| input_dims.get(a));
        if k != Some(&scale_size) {
            report(Violation::QuantizationShape {
                detail: format!("{scale_size} per-channel scales for axis {axis} of {input_dims:?}"),
            });
        }
    } else if scale_dims.len() == input_dims.len() {
        let blocked = input_dims.iter().zip(scale_dims).filter(|(i, s)| **s == 0 || *i / *s != 1).count();
        if blocked != 1 || volume(input_dims) % scale_size != 0 {
            report(Violation::QuantizationShape {
                detail: format!(
                    "scale {scale_dims:?} of input {input_dims:?}: exactly one blocked dimension is allowed"
                ),
            });
        }
    } else {
        report(Violation::QuantizationShape {
            detail: format!("scale of rank {} for input {input_dims:?}", scale_dims.len()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_matrix_parses_with_every_row() {
        let m = Matrix::tensorrt().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.ops.len(), 196, "the 10.1 GA matrix has 196 rows");
        assert_eq!((m.opset.min, m.opset.max), (9, 20));
        let dq = &m.ops["DequantizeLinear"];
        assert_eq!(dq.types, [TrtType::Int8, TrtType::Fp8, TrtType::Int4]);
        assert!(!m.ops["MatMulInteger"].supported);
    }

    #[test]
    fn every_restriction_on_an_operator_the_exporter_uses_has_a_check() {
        let m = Matrix::tensorrt().unwrap_or_else(|e| panic!("{e}"));
        for op in [
            "ReduceMean",
            "ReduceSum",
            "ReduceMax",
            "Slice",
            "Squeeze",
            "Unsqueeze",
            "QuantizeLinear",
            "DequantizeLinear",
            "LayerNormalization",
        ] {
            assert!(!m.ops[op].checks.is_empty(), "{op}");
        }
    }

    #[test]
    fn a_constant_with_a_string_value_is_reported() {
        use crate::onnx::proto::{AttributeProto, GraphProto, OperatorSetIdProto};
        let node = |attr: &str| NodeProto {
            output: vec![format!("c_{attr}")],
            name: Some(format!("const_{attr}")),
            op_type: Some("Constant".into()),
            attribute: vec![AttributeProto {
                name: Some(attr.into()),
                t: (attr == "value")
                    .then(|| TensorProto { data_type: Some(DataType::Int64 as i32), ..Default::default() }),
                s: (attr == "value_string").then(|| b"text".to_vec()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let model = ModelProto {
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(GraphProto { node: vec![node("value"), node("value_string")], ..Default::default() }),
            ..Default::default()
        };
        let report = check_model(&model, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.findings.len(), 1, "{:?}", report.findings);
        assert_eq!(report.findings[0].node, "const_value_string");
        assert_eq!(report.findings[0].violation, Violation::Attribute { name: "value_string".into() });
    }

    #[test]
    fn fp8_codes_decode() {
        assert_eq!(fp8_e4m3fn(0x00), 0.0);
        assert_eq!(fp8_e4m3fn(0x38), 1.0);
        assert_eq!(fp8_e4m3fn(0xb8), -1.0);
        assert_eq!(fp8_e4m3fn(0x7e), 448.0);
        assert!(fp8_e4m3fn(0x7f).is_nan());
    }
}
