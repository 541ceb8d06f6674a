//! PyTorch `.bin` checkpoints as `torch.save(state_dict)` writes them (readable by
//! `torch.load(weights_only=True)`): a zip holding `archive/data.pkl` (a protocol-2 pickle of an
//! `OrderedDict` of `_rebuild_tensor_v2` calls whose storages are persistent ids),
//! `archive/byteorder`, `archive/data/<key>` (one storage each) and `archive/version`; and the
//! sharded form, `pytorch_model-0000K-of-0000N.bin` with `pytorch_model.bin.index.json`.
use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::json;

use super::NamedTensor;
use super::torch_zip_writer::write_zip;
use crate::error::{Error, Result};

/// One tensor of a pickled state dict: a view of the storage `data/<key>`.
#[derive(Debug, Clone)]
pub struct PickledTensor<'a> {
    /// State-dict key.
    pub name: &'a str,
    /// Storage entry under `data/`.
    pub key: &'a str,
    /// Storage element type.
    pub dtype: Dtype,
    /// Elements in the storage.
    pub numel: usize,
    /// Offset of the view's first element, in elements.
    pub offset: usize,
    /// Shape of the view.
    pub shape: &'a [usize],
    /// Strides of the view, in elements.
    pub stride: &'a [usize],
}

/// Emits protocol-2 pickle opcodes, memoizing repeated globals and strings as `pickle` does.
struct Pickler {
    out: Vec<u8>,
    memo: HashMap<String, u32>,
    next: u32,
}

impl Pickler {
    fn put(&mut self) {
        let i = self.next;
        self.next += 1;
        match u8::try_from(i) {
            Ok(b) => self.out.extend([b'q', b]),
            Err(_) => {
                self.out.push(b'r');
                self.out.extend(i.to_le_bytes());
            }
        }
    }
    fn get(&mut self, i: u32) {
        match u8::try_from(i) {
            Ok(b) => self.out.extend([b'h', b]),
            Err(_) => {
                self.out.push(b'j');
                self.out.extend(i.to_le_bytes());
            }
        }
    }
    /// A memoized object: written once, fetched from the memo after.
    fn memoized(&mut self, key: String, write: impl FnOnce(&mut Vec<u8>)) {
        if let Some(&i) = self.memo.get(&key) {
            return self.get(i);
        }
        write(&mut self.out);
        self.memo.insert(key, self.next);
        self.put();
    }
    fn global(&mut self, module: &str, name: &str) {
        let line = format!("{module}\n{name}\n");
        self.memoized(format!("global {line}"), |out| {
            out.push(b'c');
            out.extend(line.as_bytes());
        });
    }
    fn string(&mut self, s: &str) {
        self.memoized(format!("str {s}"), |out| {
            out.push(b'X');
            out.extend((s.len() as u32).to_le_bytes());
            out.extend(s.as_bytes());
        });
    }
    fn int(&mut self, v: usize) {
        if let Ok(b) = u8::try_from(v) {
            self.out.extend([b'K', b]);
        } else if let Ok(w) = u16::try_from(v) {
            self.out.push(b'M');
            self.out.extend(w.to_le_bytes());
        } else if let Ok(d) = i32::try_from(v) {
            self.out.push(b'J');
            self.out.extend(d.to_le_bytes());
        } else {
            // LONG1: the shortest little-endian two's complement that keeps the sign bit clear.
            let bytes = (v as u64).to_le_bytes();
            let mut n = 8 - (v as u64).leading_zeros() as usize / 8;
            if bytes[n - 1] & 0x80 != 0 {
                n += 1;
            }
            let mut full = bytes.to_vec();
            full.resize(n, 0);
            self.out.extend([0x8a, n as u8]);
            self.out.extend(full);
        }
    }
    fn tuple(&mut self, items: &[usize]) {
        match items.len() {
            0 => return self.out.push(b')'),
            1..=3 => {
                items.iter().for_each(|&v| self.int(v));
                self.out.push(0x84 + items.len() as u8);
            }
            _ => {
                self.out.push(b'(');
                items.iter().for_each(|&v| self.int(v));
                self.out.push(b't');
            }
        }
        self.put();
    }
    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend([b')', b'R']);
        self.put();
    }
    fn tensor(&mut self, t: &PickledTensor) {
        self.string(t.name);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.extend([b'(', b'(']);
        self.string("storage");
        self.global("torch", storage_class(t.dtype));
        self.string(t.key);
        self.string("cpu");
        self.int(t.numel);
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.int(t.offset);
        self.tuple(t.shape);
        self.tuple(t.stride);
        self.out.push(0x89); // requires_grad = False
        self.empty_ordered_dict(); // backward hooks
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }
}

/// The `torch.XStorage` class of a dtype.
fn storage_class(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "HalfStorage",
        Dtype::BF16 => "BFloat16Storage",
        Dtype::F64 => "DoubleStorage",
        Dtype::I64 => "LongStorage",
        Dtype::I32 => "IntStorage",
        _ => "FloatStorage",
    }
}

/// The pickle of an `OrderedDict` of `tensors` (with an empty `_metadata`, set by BUILD as
/// `torch.save(model.state_dict())` does), items batched 1000 to a SETITEMS like `pickle`.
pub fn state_dict_pickle(tensors: &[PickledTensor]) -> Vec<u8> {
    let mut p = Pickler { out: vec![0x80, 2], memo: HashMap::new(), next: 0 };
    p.empty_ordered_dict();
    for batch in tensors.chunks(1000) {
        p.out.push(b'(');
        batch.iter().for_each(|t| p.tensor(t));
        p.out.push(b'u');
    }
    p.out.push(b'}');
    p.put();
    p.string("_metadata");
    p.empty_ordered_dict();
    p.out.extend([b's', b'b', b'.']);
    p.out
}

/// Writes a torch zip at `path`: `archive/data.pkl` = `pickle`, then `archive/byteorder`, each
/// storage as `archive/data/<key>`, and `archive/version`.
pub fn write_archive(path: &Path, pickle: &[u8], storages: &[(&str, &[u8])], force_zip64: bool) -> Result<()> {
    let names: Vec<String> = storages.iter().map(|(k, _)| format!("archive/data/{k}")).collect();
    let mut entries: Vec<(&str, &[u8])> = vec![("archive/data.pkl", pickle), ("archive/byteorder", b"little")];
    entries.extend(names.iter().zip(storages).map(|(n, (_, b))| (n.as_str(), *b)));
    entries.push(("archive/version", b"3\n"));
    write_zip(path, &entries, force_zip64)
}

/// Writes `tensors` (name, shape, little-endian bytes of `dtype`), each in its own storage, as
/// one `torch.save` file at `path`.
pub fn write_state_dict(path: &Path, tensors: &[NamedTensor], dtype: Dtype) -> Result<()> {
    let width = (dtype.bitsize() / 8).max(1);
    let keys: Vec<String> = (0..tensors.len()).map(|i| i.to_string()).collect();
    let strides: Vec<Vec<usize>> = tensors.iter().map(|(_, shape, _)| contiguous_strides(shape)).collect();
    let records: Vec<PickledTensor> = tensors
        .iter()
        .zip(&keys)
        .zip(&strides)
        .map(|(((name, shape, bytes), key), stride)| PickledTensor {
            name,
            key,
            dtype,
            numel: bytes.len() / width,
            offset: 0,
            shape,
            stride,
        })
        .collect();
    let storages: Vec<(&str, &[u8])> =
        keys.iter().zip(tensors).map(|(k, (_, _, b))| (k.as_str(), b.as_slice())).collect();
    write_archive(path, &state_dict_pickle(&records), &storages, false)
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Writes `tensors` as `shards` files `pytorch_model-0000K-of-0000N.bin` in `dir` (split into
/// runs of about equal bytes, in order) and `pytorch_model.bin.index.json` mapping each name to
/// its file, as transformers' `save_pretrained(safe_serialization=False)` does.
pub fn write_sharded(dir: &Path, tensors: Vec<NamedTensor>, dtype: Dtype, shards: usize) -> Result<()> {
    let shards = shards.max(1);
    let total: usize = tensors.iter().map(|(_, _, b)| b.len()).sum();
    let mut groups: Vec<Vec<NamedTensor>> = (0..shards).map(|_| Vec::new()).collect();
    let mut before = 0;
    for t in tensors {
        let group = (before * shards / total.max(1)).min(shards - 1);
        before += t.2.len();
        groups[group].push(t);
    }
    groups.retain(|g| !g.is_empty());
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    for (k, group) in groups.iter().enumerate() {
        let file = format!("pytorch_model-{:05}-of-{n:05}.bin", k + 1);
        for (name, _, _) in group {
            weight_map.insert(name.clone(), json!(file));
        }
        write_state_dict(&dir.join(&file), group, dtype)?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join("pytorch_model.bin.index.json");
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
}
