//! The decoder's key/value cache for one conversation, in the layout the manifest names.
//!
//! - [`KvLayout::Concat`] (standard ONNX): the decoder takes `past_key_values.*` and returns
//!   `present.*` = past followed by the new positions. The cache holds the `present` values ONNX
//!   Runtime allocated and hands them back as the next step's inputs by reference: nothing of the
//!   cache passes through host code, but inside the session each step's `Concat` writes a new
//!   tensor of the whole cache (O(context) bytes per step).
//! - [`KvLayout::SharedBuffer`] (target `onnxruntime`): one buffer per layer and key/value,
//!   [1, kv_heads, capacity, head_dim], allocated once with ONNX Runtime's allocator and bound with
//!   I/O binding as both `past_key_values.*` and `present.*`; `GroupQueryAttention` writes only the
//!   new positions into it. The capacity is what the conversation asked for ([`KvCache::reserve`]),
//!   grown (one copy of the held positions) if a later step needs more.
use std::path::Path;

use half::f16;
use ort::memory::Allocator;
use ort::session::{IoBinding, Session, SessionOutputs};
use ort::value::{DynTensor, DynValue, PrimitiveTensorElementType, Tensor, TensorElementType};

use crate::error::{Error, Result};
use crate::manifest::{DType, Dim, KvLayout, Manifest, ModelDims, Target, TensorSpec};

/// Shared buffers grow in steps of this many positions (fewer reallocations across follow-ups).
const CAPACITY_STEP: usize = 256;

/// Per-layer keys and values of one conversation, and how many positions they hold.
pub struct KvCache {
    store: Store,
    /// `past_key_values.{i}.{key,value}` in layer order.
    input_names: Vec<String>,
    /// `present.{i}.{key,value}` in layer order.
    output_names: Vec<String>,
    len: usize,
}

enum Store {
    /// The `present.*` values of the last step, `[key_0, value_0, key_1, value_1, ...]`.
    Concat(Vec<DynValue>),
    /// Buffers bound in place (boxed: the binding makes this variant large).
    Shared(Box<SharedBuffers>),
}

struct SharedBuffers {
    /// `[key_0, value_0, ...]`, each [1, kv_heads, capacity, head_dim].
    buffers: Vec<DynTensor>,
    /// Two per layer.
    slots: usize,
    dtype: TensorElementType,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// Positions the conversation said it will need.
    wanted: usize,
    /// The decoder binding; created on the first step (it belongs to the decoder's session).
    binding: Option<IoBinding>,
    /// The bound `logits` output and its row count.
    logits: Option<(usize, Tensor<f32>)>,
}

/// The small per-step inputs of a bound decoder call.
pub struct StepInputs {
    /// `inputs_embeds` [1, new, hidden], where `embed.onnx` left it.
    pub embeds: DynTensor,
    /// `attention_mask` [1, total], all ones.
    pub mask: Tensor<i64>,
    /// `logits_to_keep` [1].
    pub keep: usize,
    /// Rows of the logits.
    pub vocab: usize,
}

fn element_type(dtype: DType) -> Result<TensorElementType> {
    match dtype {
        DType::F32 => Ok(TensorElementType::Float32),
        DType::F16 => Ok(TensorElementType::Float16),
        DType::I64 => Err(Error::Request("the manifest gives the KV cache an integer type".into())),
    }
}

impl KvCache {
    /// An empty cache (zero positions) for a model of `dims`, in the layout its manifest names.
    /// Shared buffers are allocated on the first step, sized by [`Self::reserve`].
    pub fn new(dims: &ModelDims) -> Result<Self> {
        let dtype = element_type(dims.kv_dtype)?;
        let mut input_names = Vec::with_capacity(2 * dims.num_layers);
        let mut output_names = Vec::with_capacity(2 * dims.num_layers);
        for layer in 0..dims.num_layers {
            for part in ["key", "value"] {
                input_names.push(format!("past_key_values.{layer}.{part}"));
                output_names.push(format!("present.{layer}.{part}"));
            }
        }
        let store = match dims.kv_layout {
            KvLayout::Concat => {
                let shape = [1usize, dims.num_kv_heads, 0, dims.head_dim];
                let empty = || -> Result<DynValue> {
                    Ok(match dtype {
                        TensorElementType::Float16 => Tensor::<f16>::from_array((shape, Vec::<f16>::new()))?.into_dyn(),
                        _ => Tensor::<f32>::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
                    })
                };
                Store::Concat((0..2 * dims.num_layers).map(|_| empty()).collect::<Result<_>>()?)
            }
            KvLayout::SharedBuffer => Store::Shared(Box::new(SharedBuffers {
                buffers: Vec::new(),
                slots: 2 * dims.num_layers,
                dtype,
                kv_heads: dims.num_kv_heads,
                head_dim: dims.head_dim,
                capacity: 0,
                wanted: 0,
                binding: None,
                logits: None,
            })),
        };
        Ok(Self { store, input_names, output_names, len: 0 })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the first `len` positions (a conversation cut back to a prefix it shares
    /// with a new prompt). Shared buffers only forget the rest; concatenated values are copied.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if let Store::Concat(values) = &mut self.store {
            for v in values.iter_mut() {
                *v = match v.try_extract_tensor::<f32>() {
                    Ok((shape, data)) => first_positions(shape, data, len)?,
                    Err(_) => {
                        let (shape, data) = v.try_extract_tensor::<f16>()?;
                        first_positions(shape, data, len)?
                    }
                };
            }
        }
        self.len = len;
        Ok(())
    }

    /// The layout this cache feeds the decoder in.
    pub fn layout(&self) -> KvLayout {
        match self.store {
            Store::Concat(_) => KvLayout::Concat,
            Store::Shared(_) => KvLayout::SharedBuffer,
        }
    }

    /// Positions the shared buffers can hold without growing (0 before the first step, and for
    /// the concatenating layout).
    pub fn capacity(&self) -> usize {
        match &self.store {
            Store::Concat(_) => 0,
            Store::Shared(s) => s.capacity,
        }
    }

    /// Says the conversation will need `positions` in all (prompt plus the most new tokens), so
    /// shared buffers are allocated once at that size rather than grown step by step.
    pub fn reserve(&mut self, positions: usize) {
        if let Store::Shared(s) = &mut self.store {
            s.wanted = s.wanted.max(positions);
        }
    }

    /// `(input name, value)` pairs to feed a concatenating decoder (none for shared buffers,
    /// which are bound instead: see [`Self::run_bound`]).
    pub fn inputs(&self) -> impl Iterator<Item = (&str, &DynValue)> {
        let values: &[DynValue] = match &self.store {
            Store::Concat(v) => v,
            Store::Shared(_) => &[],
        };
        self.input_names.iter().map(String::as_str).zip(values)
    }

    /// `present.*` names in layer order (bound to the device's memory by a concatenating step).
    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// Takes the `present.*` outputs of a concatenating step that added `added` positions.
    pub fn update(&mut self, outputs: &mut SessionOutputs<'_>, added: usize) -> Result<()> {
        let Store::Concat(values) = &mut self.store else {
            return Err(Error::Request("a shared-buffer KV cache is updated in place by run_bound".into()));
        };
        for (slot, name) in values.iter_mut().zip(&self.output_names) {
            *slot = outputs
                .remove(name.as_str())
                .ok_or_else(|| Error::Request(format!("decoder output {name} is missing")))?;
        }
        self.len += added;
        Ok(())
    }

    /// Runs one step of a shared-buffer decoder on `session` (the decoder's, always the same
    /// one for a cache) with the buffers bound in place; `limit` is the longest sequence the
    /// engine accepts. Returns the logits of the last `inputs.keep` positions, row-major.
    pub fn run_bound(&mut self, session: &mut Session, inputs: StepInputs, limit: usize) -> Result<Vec<f32>> {
        let Store::Shared(s) = &mut self.store else {
            return Err(Error::Request("run_bound needs a decoder with shared KV buffers".into()));
        };
        let added = inputs.embeds.shape()[1] as usize;
        let total = self.len + added;
        if total > limit {
            return Err(Error::ContextOverflow { needed: total, max_new: 0, limit });
        }
        let grew = s.ensure_capacity(self.len, total, limit)?;
        let fresh = s.binding.is_none();
        let binding = match &mut s.binding {
            Some(b) => b,
            none => none.insert(session.create_binding()?),
        };
        if grew || fresh {
            for ((input, output), buffer) in self.input_names.iter().zip(&self.output_names).zip(s.buffers.iter_mut()) {
                binding.bind_input(input.as_str(), buffer)?;
                binding.bind_output(output.as_str(), &mut *buffer)?;
            }
        }
        let logits = match &mut s.logits {
            Some((rows, t)) if *rows == inputs.keep => t,
            slot => {
                let mut t = Tensor::<f32>::new(&Allocator::default(), [1usize, inputs.keep, inputs.vocab])?;
                binding.bind_output("logits", &mut t)?;
                &mut slot.insert((inputs.keep, t)).1
            }
        };
        binding.bind_input("inputs_embeds", &inputs.embeds)?;
        binding.bind_input("attention_mask", &inputs.mask)?;
        let keep = Tensor::<i64>::from_array(([1usize], vec![inputs.keep as i64]))?;
        binding.bind_input("logits_to_keep", &keep)?;
        drop(session.run_binding(binding)?);
        let (_, out) = logits.try_extract_tensor::<f32>()?;
        let out = out.to_vec();
        self.len = total;
        Ok(out)
    }
}

impl SharedBuffers {
    /// Makes room for `total` positions, keeping the `held` ones. Returns whether the buffers
    /// changed (and must be bound again).
    fn ensure_capacity(&mut self, held: usize, total: usize, limit: usize) -> Result<bool> {
        if total <= self.capacity {
            return Ok(false);
        }
        let capacity = self.wanted.max(total).next_multiple_of(CAPACITY_STEP).min(limit).max(total);
        let allocator = Allocator::default();
        let old = std::mem::take(&mut self.buffers);
        let mut fresh = Vec::with_capacity(self.slots);
        let shape = [1usize, self.kv_heads, capacity, self.head_dim];
        for i in 0..self.slots {
            let mut buffer = DynTensor::new(&allocator, self.dtype, shape)?;
            if let Some(previous) = old.get(i)
                && held > 0
            {
                let rows = (self.kv_heads, self.capacity, capacity, self.head_dim, held);
                match self.dtype {
                    TensorElementType::Float16 => copy_prefix::<f16>(previous, &mut buffer, rows)?,
                    _ => copy_prefix::<f32>(previous, &mut buffer, rows)?,
                }
            }
            fresh.push(buffer);
        }
        self.buffers = fresh;
        self.capacity = capacity;
        Ok(true)
    }
}

/// The first `len` positions of a `[1, heads, positions, head_dim]` value, as a new value.
fn first_positions<T: PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static>(
    shape: &[i64],
    data: &[T],
    len: usize,
) -> Result<DynValue> {
    let dim = |i: usize| shape.get(i).and_then(|&d| usize::try_from(d).ok());
    let (Some(1), Some(heads), Some(held), Some(head_dim)) = (dim(0), dim(1), dim(2), dim(3)) else {
        return Err(Error::Request(format!("a KV value of shape {shape:?} is not [1, heads, positions, head_dim]")));
    };
    let mut out = Vec::with_capacity(heads * len * head_dim);
    for h in 0..heads {
        let start = h * held * head_dim;
        out.extend_from_slice(&data[start..start + len.min(held) * head_dim]);
    }
    Ok(Tensor::from_array(([1usize, heads, len.min(held), head_dim], out))?.into_dyn())
}

/// Copies the first `held` positions of every head from `from` (capacity `old_cap`) to `to`
/// (capacity `new_cap`).
fn copy_prefix<T: PrimitiveTensorElementType + Copy>(
    from: &DynTensor,
    to: &mut DynTensor,
    (heads, old_cap, new_cap, head_dim, held): (usize, usize, usize, usize, usize),
) -> Result<()> {
    let (_, src) = from.try_extract_tensor::<T>()?;
    let (_, dst) = to.try_extract_tensor_mut::<T>()?;
    for h in 0..heads {
        let n = held * head_dim;
        let s = h * old_cap * head_dim;
        let d = h * new_cap * head_dim;
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
    }
    Ok(())
}

/// Checks that the decoder's interface in `manifest` is the one its KV layout implies: every
/// layer's `past_key_values.*` input and `present.*` output with the manifest's KV heads, head
/// width and element type, `position_ids` only where positions are explicit, and the
/// ONNX Runtime target for shared buffers. The cache takes its shapes from these dimensions.
pub fn check_decoder(dir: &Path, manifest: &Manifest) -> Result<()> {
    let dims = &manifest.model;
    let entry = &manifest.graphs.decoder;
    let bad = |message: String| Err(Error::GraphMismatch { path: dir.join(&entry.file), message });
    // The in-place twin of a standard engine's decoder uses contrib operators by definition.
    let twin = manifest.graphs.decoder_in_place.as_ref() == Some(entry);
    if dims.kv_layout == KvLayout::SharedBuffer && manifest.target != Target::OnnxRuntime && !twin {
        return bad("shared KV buffers (GroupQueryAttention) need target onnxruntime".into());
    }
    let find = |specs: &'_ [TensorSpec], name: &str| specs.iter().find(|s| s.name == name).cloned();
    let wants_positions = dims.kv_layout == KvLayout::Concat;
    if find(&entry.inputs, "position_ids").is_some() != wants_positions {
        let verb = if wants_positions { "needs" } else { "takes no" };
        return bad(format!("the {:?} KV layout {verb} position_ids", dims.kv_layout));
    }
    for layer in 0..dims.num_layers {
        for part in ["key", "value"] {
            for (specs, name) in [
                (&entry.inputs, format!("past_key_values.{layer}.{part}")),
                (&entry.outputs, format!("present.{layer}.{part}")),
            ] {
                let Some(spec) = find(specs, &name) else {
                    return bad(format!("{name} is missing"));
                };
                let heads = Dim::Fixed(dims.num_kv_heads as i64);
                let width = Dim::Fixed(dims.head_dim as i64);
                let shape_ok = spec.shape.len() == 4 && spec.shape[1] == heads && spec.shape[3] == width;
                if !shape_ok || spec.dtype != dims.kv_dtype {
                    return bad(format!(
                        "{spec} differs from the model's {} KV heads of width {} in {:?}",
                        dims.num_kv_heads, dims.head_dim, dims.kv_dtype
                    ));
                }
            }
        }
    }
    Ok(())
}
