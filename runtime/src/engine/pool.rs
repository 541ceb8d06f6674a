//! KV slots for the in-place decoder (`GroupQueryAttention`, target `onnxruntime`).
//!
//! Per layer and key/value, one anonymous memory mapping `[slots, kv_heads, positions,
//! head_dim]`, where `positions` is the longest context plus one spare position. A decode call
//! binds a run of consecutive slots as the batch (rows `first..first + rows`), a prefill chunk
//! binds one slot (ONNX Runtime's CPU `GroupQueryAttention` takes more than one new position
//! per row only at batch 1). Past and present are bound to the same memory, so the operator
//! writes only the new positions and no step copies the cache.
//!
//! Pages are committed by the kernel when first written, so resident memory follows the
//! positions in use; a freed slot's pages are handed back ([`SlotPool::release`]). On a GPU the
//! same buffers are allocated once in device memory through the session's allocator
//! ([`SlotPool::with_allocator`]), so decode steps read and write the cache where it lives and
//! only the embeddings `embed.onnx` left there go in and the last logits row comes out. The spare
//! position exists for rows that ride along in a decode call without decoding (see
//! [`DecodeRow::Idle`]): their write lands one past what they hold and is overwritten before it
//! is ever read.
use std::ffi::CString;

use memmap2::{MmapMut, UncheckedAdvice};
use ort::AsPointer;
use ort::memory::{Allocator, MemoryInfo};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, DynValue, DynValueRefMut, Shape, Tensor, TensorElementType, TensorRefMut};

use crate::error::{Error, Result};
use crate::manifest::{DType, ModelDims};

/// One row of a decode call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DecodeRow {
    /// A sequence decoding one token: its token's embedding is fed at position `held`.
    Decode { held: usize },
    /// A slot inside the run that does not decode now; it is fed token 0's embedding at `held`
    /// (the spare position at most), whose output is discarded.
    Idle { held: usize },
}

impl DecodeRow {
    fn held(self) -> usize {
        match self {
            DecodeRow::Decode { held } | DecodeRow::Idle { held } => held,
        }
    }
}

/// Where the buffers live.
enum Storage {
    /// Anonymous mappings in host memory (the CPU provider).
    Host,
    /// Tensors from an ONNX Runtime allocator (CUDA: device memory), allocated once. The
    /// tensors are dropped before the allocator that freed them needs to exist (field order).
    Allocated { tensors: Vec<DynTensor>, info: MemoryInfo<'static>, _allocator: Allocator },
}

/// The preallocated KV memory of all slots.
pub(crate) struct SlotPool {
    /// `[key_0, value_0, key_1, ...]` (host storage; empty otherwise).
    maps: Vec<MmapMut>,
    storage: Storage,
    /// `(past_key_values.*, present.*)` names, in the order of `maps`.
    names: Vec<(String, String)>,
    dtype: TensorElementType,
    kv_heads: usize,
    head_dim: usize,
    /// Positions per slot and head: the context plus the spare.
    positions: usize,
    slots: usize,
    elem_bytes: usize,
}

/// Bytes one position of one sequence takes in the cache, all layers.
pub(crate) fn bytes_per_position(dims: &ModelDims) -> u64 {
    let elem = match dims.kv_dtype {
        DType::F16 => 2,
        _ => 4,
    };
    (2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * elem) as u64
}

impl SlotPool {
    /// Maps `slots` slots of `context` positions (plus the spare) for a model of `dims`.
    pub(crate) fn new(dims: &ModelDims, slots: usize, context: usize) -> Result<Self> {
        let mut pool = Self::layout(dims, slots, context)?;
        let bytes = slots * pool.slot_bytes();
        for _ in &pool.names {
            let map = MmapMut::map_anon(bytes.max(1)).map_err(|e| {
                Error::Request(format!("could not map {bytes} bytes of KV cache for {slots} slots: {e}"))
            })?;
            pool.maps.push(map);
        }
        Ok(pool)
    }

    /// The pool's shape and names, with no memory yet.
    fn layout(dims: &ModelDims, slots: usize, context: usize) -> Result<Self> {
        let (dtype, elem_bytes) = match dims.kv_dtype {
            DType::F32 => (TensorElementType::Float32, 4),
            DType::F16 => (TensorElementType::Float16, 2),
            DType::I64 => return Err(Error::Request("the manifest gives the KV cache an integer type".into())),
        };
        let names = (0..dims.num_layers)
            .flat_map(|layer| {
                ["key", "value"]
                    .map(|part| (format!("past_key_values.{layer}.{part}"), format!("present.{layer}.{part}")))
            })
            .collect();
        Ok(Self {
            maps: Vec::new(),
            storage: Storage::Host,
            names,
            dtype,
            kv_heads: dims.num_kv_heads,
            head_dim: dims.head_dim,
            positions: context + 1,
            slots,
            elem_bytes,
        })
    }

    /// Like [`SlotPool::new`], with every buffer allocated up front from `session`'s allocator
    /// for `info` (CUDA device memory on a GPU). Host-accessible memory is filled with NaN, so a
    /// read of a position never written cannot go unnoticed (the tests run this on the CPU).
    pub(crate) fn with_allocator(
        dims: &ModelDims,
        slots: usize,
        context: usize,
        session: &Session,
        info: MemoryInfo<'static>,
    ) -> Result<Self> {
        let mut pool = Self::layout(dims, slots, context)?;
        let allocator = Allocator::new(session, info.clone())?;
        let shape = [slots as i64, pool.kv_heads as i64, pool.positions as i64, pool.head_dim as i64];
        let mut tensors = Vec::with_capacity(pool.names.len());
        for _ in &pool.names {
            let mut t = DynTensor::new(&allocator, pool.dtype, shape)?;
            if info.is_cpu_accessible() {
                let ptr = t.data_ptr_mut().cast::<u8>();
                let bytes = slots * pool.slot_bytes();
                // SAFETY: the tensor owns `bytes` bytes at `ptr`, host-accessible.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, bytes) };
                match pool.dtype {
                    TensorElementType::Float16 => {
                        buf.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&[0x00, 0x7e]))
                    }
                    _ => buf.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&f32::NAN.to_le_bytes())),
                }
            }
            tensors.push(t);
        }
        pool.storage = Storage::Allocated { tensors, info, _allocator: allocator };
        Ok(pool)
    }

    fn slot_bytes(&self) -> usize {
        self.kv_heads * self.positions * self.head_dim * self.elem_bytes
    }

    /// Hands a freed slot's pages back to the kernel (its contents become zeros).
    pub(crate) fn release(&mut self, slot: usize) {
        if !matches!(self.storage, Storage::Host) {
            return; // allocated once, kept for the next sequence
        }
        let (size, page) = (self.slot_bytes(), 4096);
        let start = (slot * size).next_multiple_of(page);
        let end = ((slot + 1) * size) / page * page;
        if end > start {
            for map in &self.maps {
                // SAFETY: no reference into the mapping outlives a decoder call, and none is
                // running (the scheduler thread owns the pool); the pages only become zeros.
                // An error here only means the memory stays resident.
                let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
    }

    /// Runs one decode call over slots `first..first + rows.len()`: `embeds` is
    /// `[rows, 1, hidden]` (zeros for idle rows). Returns the logits `[rows, vocab]`.
    pub(crate) fn decode(
        &mut self,
        session: &mut Session,
        first: usize,
        rows: &[DecodeRow],
        embeds: DynTensor,
        fetch: Fetch,
    ) -> Result<Fetched> {
        let width = rows.iter().map(|r| r.held() + 1).max().unwrap_or(1);
        let mut mask = vec![0i64; rows.len() * width];
        for (r, row) in rows.iter().enumerate() {
            mask[r * width..r * width + row.held() + 1].fill(1);
        }
        let mask = Tensor::from_array(([rows.len(), width], mask))?;
        self.run(session, first, rows.len(), embeds, mask, fetch)
    }

    /// Runs one prefill chunk of slot `slot`, which holds `held` positions: `embeds` is
    /// `[1, chunk, hidden]`. Returns the last position's logits.
    pub(crate) fn prefill(
        &mut self,
        session: &mut Session,
        slot: usize,
        held: usize,
        embeds: DynTensor,
    ) -> Result<Vec<f32>> {
        let total = held + embeds.shape()[1] as usize;
        let mask = Tensor::from_array(([1usize, total], vec![1i64; total]))?;
        match self.run(session, slot, 1, embeds, mask, Fetch::Logits)? {
            Fetched::Logits(logits) => Ok(logits),
            Fetched::Tokens(_) => Err(Error::Request("a prefill chunk brought back tokens, not logits".into())),
        }
    }

    fn run(
        &mut self,
        session: &mut Session,
        first: usize,
        rows: usize,
        embeds: DynTensor,
        mask: Tensor<i64>,
        fetch: Fetch,
    ) -> Result<Fetched> {
        let written = mask.shape()[1] as usize;
        if first + rows > self.slots || written > self.positions {
            return Err(Error::Request(format!(
                "KV rows {first}..{} of {} slots, {written} positions of {}",
                first + rows,
                self.slots,
                self.positions
            )));
        }
        let mut binding = session.create_binding()?;
        let offset = first * self.slot_bytes();
        let shape = [rows as i64, self.kv_heads as i64, self.positions as i64, self.head_dim as i64];
        // Views of the buffers; they live until the run is over.
        let (bases, info): (Vec<*mut u8>, MemoryInfo<'static>) = match &mut self.storage {
            Storage::Host => (self.maps.iter_mut().map(|m| m.as_mut_ptr()).collect(), MemoryInfo::default()),
            Storage::Allocated { tensors, info, .. } => {
                (tensors.iter_mut().map(|t| t.data_ptr_mut().cast::<u8>()).collect(), info.clone())
            }
        };
        let mut views = Vec::with_capacity(2 * bases.len());
        for (base, (input, output)) in bases.into_iter().zip(&self.names) {
            // SAFETY: the range [offset, offset + rows * slot_bytes) lies inside the buffer
            // (checked above), the buffer outlives the views (dropped at the end of this
            // call), and nothing else reads or writes it during the call.
            let ptr = unsafe { base.add(offset) }.cast();
            let past = unsafe { view(self.dtype, ptr, &shape, &info) }?;
            let present = unsafe { view(self.dtype, ptr, &shape, &info) }?;
            bind_input_in_place(&mut binding, input, &past)?;
            binding.bind_output(output.as_str(), present)?;
            views.push(past);
        }
        binding.bind_input("inputs_embeds", &embeds)?;
        binding.bind_input("attention_mask", &mask)?;
        let keep = Tensor::<i64>::from_array(([1usize], vec![1]))?;
        binding.bind_input("logits_to_keep", &keep)?;
        let name = match fetch {
            Fetch::Logits => "logits",
            Fetch::NextToken => "next_token",
        };
        binding.bind_output_to_device(name, &MemoryInfo::default())?;
        let outputs = session.run_binding(&binding)?;
        let fetched = match fetch {
            Fetch::Logits => Fetched::Logits(outputs[name].try_extract_tensor::<f32>()?.1.to_vec()),
            Fetch::NextToken => Fetched::Tokens(outputs[name].try_extract_tensor::<i64>()?.1.to_vec()),
        };
        drop(outputs);
        drop(binding);
        drop(views);
        Ok(fetched)
    }
}

/// What a decode call brings back from the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fetch {
    /// Each row's last logits.
    Logits,
    /// Each row's argmax id (the decoder's `next_token` output): one id per row leaves the
    /// device instead of the vocabulary's logits.
    NextToken,
}

/// What a decode call brought back: `[rows * vocab]` logits or `[rows]` ids.
pub(crate) enum Fetched {
    Logits(Vec<f32>),
    Tokens(Vec<i64>),
}

/// A tensor over `ptr` with `shape`, of the cache's element type.
///
/// # Safety
/// `ptr` must be valid for the shape's bytes for as long as the returned value is used.
unsafe fn view(
    dtype: TensorElementType,
    ptr: *mut std::ffi::c_void,
    shape: &[i64; 4],
    info: &MemoryInfo<'static>,
) -> Result<DynValueRefMut<'static>> {
    let shape = Shape::new(shape.iter().copied());
    let info = info.clone();
    Ok(match dtype {
        TensorElementType::Float16 => unsafe { TensorRefMut::<half::f16>::from_raw(info, ptr, shape) }?.into_dyn(),
        _ => unsafe { TensorRefMut::<f32>::from_raw(info, ptr, shape) }?.into_dyn(),
    })
}

/// Binds `value` as input `name` without the copy `IoBinding::bind_input` makes of values over
/// borrowed memory: the in-place decoder needs its past input and present output to be the same
/// memory. The caller keeps `value` alive until the run is over.
fn bind_input_in_place(binding: &mut IoBinding, name: &str, value: &DynValue) -> Result<()> {
    let name_c = CString::new(name).map_err(|_| Error::Request(format!("input name {name:?} has a NUL byte")))?;
    let api = ort::api();
    // SAFETY: both pointers come from live ort objects; ONNX Runtime copies the name and keeps
    // a reference to the OrtValue, which the caller keeps alive for the run.
    let status = unsafe { (api.BindInput)(binding.ptr_mut(), name_c.as_ptr(), value.ptr()) };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status is an OrtStatus we own and release once.
    let message = unsafe {
        let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
        (api.ReleaseStatus)(status.0);
        text
    };
    Err(Error::Request(format!("binding {name}: {message}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::manifest::KvLayout;
    use crate::memory::rss_anon_mb;

    fn dims() -> ModelDims {
        ModelDims {
            num_frames: 8,
            tokens_per_frame: 257,
            tokens_per_image: 256,
            text_hidden: 256,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            vocab_size: 1000,
            image_size: 224,
            patch_size: 14,
            vision_hidden: 64,
            vision_intermediate: 256,
            vision_layers: 2,
            vision_layers_run: 2,
            vision_feature_layers: 1,
            text_intermediate: 512,
            kv_dtype: DType::F32,
            kv_layout: KvLayout::SharedBuffer,
        }
    }

    /// Resident memory follows what is written, and a released slot's pages go back.
    #[test]
    fn mapped_slots_cost_memory_only_once_written_and_released_slots_give_it_back() {
        // 64 slots of 4,096 positions: 4 maps of 128 MiB each, 512 MiB in all.
        let before = rss_anon_mb().unwrap();
        let mut pool = SlotPool::new(&dims(), 64, 4095).unwrap();
        let total_mb = (pool.maps.len() * pool.maps[0].len()) as f64 / (1 << 20) as f64;
        let base = rss_anon_mb().unwrap();
        for map in &mut pool.maps {
            map[..].fill(1);
        }
        let written = rss_anon_mb().unwrap();
        for slot in 0..64 {
            pool.release(slot);
        }
        let released = rss_anon_mb().unwrap();
        assert!(base - before < 0.1 * total_mb, "mapping {total_mb} MB raised RssAnon by {} MB", base - before);
        assert!(written - base > 0.9 * total_mb, "writing {total_mb} MB raised RssAnon by {} MB", written - base);
        assert!(written - released > 0.9 * total_mb, "releasing every slot gave back {} MB", written - released);
        assert!(pool.maps.iter().all(|m| m[pool.slot_bytes()..2 * pool.slot_bytes()].iter().all(|b| *b == 0)));
    }
}
