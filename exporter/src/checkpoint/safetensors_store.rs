//! Memory-mapped weight shards, safetensors or PyTorch `.bin` (single file or sharded with an
//! index), read tensor by tensor.
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::shards::{self, Located, WeightsFormat};
use super::torch_store;
use crate::error::{Error, Result};

struct Shard {
    path: PathBuf,
    map: Mmap,
}

struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint directory, memory-mapped; nothing is read until asked for.
pub struct TensorStore {
    dir: PathBuf,
    format: WeightsFormat,
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
}

/// Why the safetensors parser rejected `file`, naming the tensor at fault where one can be found.
///
/// The parser checks offsets in file order, so a tensor pointing past the end is reported as a
/// bad offset of its neighbour and a truncated file as "not fully covered"; both are worded here.
fn explain(file: &[u8], err: safetensors::SafeTensorError) -> String {
    let header_len = file.get(..8).and_then(|n| n.try_into().ok()).map(u64::from_le_bytes);
    let Some(header_len) = header_len.and_then(|n| usize::try_from(n).ok()) else {
        return format!("{} bytes, too short for a header ({err})", file.len());
    };
    let Some(header) = file.get(8..).and_then(|rest| rest.get(..header_len)) else {
        return format!(
            "header of {header_len} bytes runs past the end of the {}-byte file; truncated? ({err})",
            file.len()
        );
    };
    let data_len = (file.len() - 8 - header_len) as u64;
    let Ok(tensors) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(header) else {
        return err.to_string();
    };
    let offsets = |info: &serde_json::Value| -> Option<(u64, u64)> {
        let o = info.get("data_offsets")?;
        Some((o.get(0)?.as_u64()?, o.get(1)?.as_u64()?))
    };
    let past_end = tensors
        .iter()
        .filter_map(|(name, info)| offsets(info).map(|(start, end)| (name, start, end)))
        .filter(|&(_, _, end)| end > data_len)
        .min_by_key(|&(_, start, _)| start);
    if let Some((name, start, end)) = past_end {
        return format!(
            "tensor {name} lies at data bytes {start}..{end}, past the end of the {data_len} bytes of data; truncated?"
        );
    }
    if let Some(wrong) = tensors.iter().find_map(|(name, info)| wrong_size(name, info, offsets(info)?)) {
        return wrong;
    }
    match err {
        safetensors::SafeTensorError::InvalidOffset(name) => {
            let at = tensors.get(&name).and_then(offsets).map(|(s, e)| format!(" {s}..{e}")).unwrap_or_default();
            format!(
                "tensor {name}'s data_offsets{at} overlap the tensor before it or leave a gap (tensors must tile \
                 the data in order)"
            )
        }
        err => err.to_string(),
    }
}

/// Says how tensor `name`'s dtype and shape disagree with the `start..end` bytes it claims, if
/// they do.
fn wrong_size(name: &str, info: &serde_json::Value, (start, end): (u64, u64)) -> Option<String> {
    let dtype: Dtype = serde_json::from_value(info.get("dtype")?.clone()).ok()?;
    let shape: Vec<u64> = serde_json::from_value(info.get("shape")?.clone()).ok()?;
    let bits = shape.iter().try_fold(dtype.bitsize() as u64, |n, &d| n.checked_mul(d));
    let held = end.checked_sub(start)?;
    match bits {
        Some(bits) if bits == held.saturating_mul(8) => None,
        Some(bits) => Some(format!(
            "tensor {name}: dtype {dtype:?} and shape {shape:?} need {} bytes but its data_offsets {start}..{end} \
             hold {held}",
            bits.div_ceil(8)
        )),
        None => Some(format!("tensor {name}: shape {shape:?} of {dtype:?} is too large to address")),
    }
}

/// Name, dtype, shape and byte range of every tensor of the safetensors file `map` (at `path`).
fn safetensors_entries(path: &Path, map: &[u8]) -> Result<Vec<(String, Located)>> {
    let bad =
        |e: safetensors::SafeTensorError| Error::Safetensors { path: path.to_path_buf(), message: explain(map, e) };
    let (header_len, metadata) = SafeTensors::read_metadata(map).map_err(bad)?;
    let base = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        if base + end > map.len() {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: format!("tensor {name} ends past the end of the file"),
            });
        }
        out.push((
            name,
            Located { dtype: info.dtype, shape: info.shape.clone(), start: base + start, end: base + end },
        ));
    }
    Ok(out)
}

impl TensorStore {
    /// Maps every shard of the checkpoint in `dir` and indexes its tensors.
    pub fn open(dir: &Path) -> Result<Self> {
        let found = shards::find(dir)?;
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for path in found.files {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only; a checkpoint changed on disk while we export is
            // the user's race, and at worst gives wrong weights, never memory unsafety in Rust.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let shard = shards.len();
            let found = match found.format {
                WeightsFormat::Safetensors => safetensors_entries(&path, &map)?,
                WeightsFormat::TorchBin => torch_store::read(&path, &map)?,
            };
            for (name, Located { dtype, shape, start, end }) in found {
                entries.insert(name, Entry { shard, dtype, shape, start, end });
            }
            shards.push(Shard { path, map });
        }
        Ok(Self { dir: dir.to_path_buf(), format: found.format, shards, entries })
    }

    /// The format of the checkpoint's weight files.
    pub fn format(&self) -> WeightsFormat {
        self.format
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The dtype of the first tensor, as the checkpoint's weight type.
    pub fn dominant_dtype(&self) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for e in self.entries.values() {
            *counts.entry(format!("{:?}", e.dtype).to_lowercase()).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d).unwrap_or_default()
    }

    /// Reads `name` as f32, checking it has `expected` shape.
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), dir: self.dir.clone() })?;
        if entry.shape != expected {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let shard = &self.shards[entry.shard];
        let bytes = &shard.map[entry.start..entry.end];
        let count: usize = expected.iter().product();
        let width = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(Error::UnsupportedDtype { name: name.to_string(), dtype: format!("{other:?}") });
            }
        };
        if bytes.len() != count * width {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                message: format!("tensor {name} holds {} bytes for {count} elements", bytes.len()),
            });
        }
        // Non-finite values are looked for in the conversion's own pass, as it goes.
        let mut values = Vec::with_capacity(count);
        let mut finite = true;
        let mut push = |v: f32| {
            finite &= v.is_finite();
            values.push(v);
        };
        match entry.dtype {
            Dtype::F32 => bytes.chunks_exact(4).for_each(|c| push(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            Dtype::F16 => bytes.chunks_exact(2).for_each(|c| push(f16::from_le_bytes([c[0], c[1]]).to_f32())),
            _ => bytes.chunks_exact(2).for_each(|c| push(bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        }
        if !finite && let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFiniteWeight { path: shard.path.clone(), name: name.to_string(), index, value });
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    /// A valid file of three tensors (f32 [2, 3], bf16 [4], f16 []), as `safetensors` writes it.
    fn valid() -> Vec<u8> {
        let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let b = [0u8; 8];
        let c = [0u8; 2];
        let views = [
            ("a", safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
            ("b", safetensors::tensor::TensorView::new(Dtype::BF16, vec![4], &b).unwrap()),
            ("c", safetensors::tensor::TensorView::new(Dtype::F16, vec![], &c).unwrap()),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    /// `header` (JSON) and `data` laid out as a safetensors file.
    fn join(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
        let header = serde_json::to_vec(header).unwrap();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(&header);
        file.extend(data);
        file
    }

    /// The message of the error reading `file`.
    fn message(file: &[u8]) -> String {
        match safetensors_entries(Path::new("w.safetensors"), file) {
            Err(Error::Safetensors { message, .. }) => {
                eprintln!("{message}");
                message
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    /// The valid file's header, with `edit` applied, over its data.
    fn lie(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let file = valid();
        let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
        edit(&mut header);
        join(&header, &file[8 + n..])
    }

    #[test]
    fn lying_headers_name_the_tensor() {
        // Overlapping: b starts inside a.
        let m = message(&lie(|h| h["b"]["data_offsets"] = serde_json::json!([16, 24])));
        assert!(m.contains("tensor b") || m.contains("tensor c"), "{m}");
        // The dtype disagrees with the bytes held.
        let m = message(&lie(|h| h["a"]["dtype"] = serde_json::json!("F16")));
        assert!(m.contains("tensor a") && m.contains("need 12 bytes") && m.contains("hold 24"), "{m}");
        // The shape disagrees.
        let m = message(&lie(|h| h["b"]["shape"] = serde_json::json!([5])));
        assert!(m.contains("tensor b") && m.contains("need 10 bytes"), "{m}");
        let m = message(&lie(|h| h["a"]["shape"] = serde_json::json!([u64::MAX, 3])));
        assert!(m.contains("tensor a") && m.contains("too large"), "{m}");
        // Past the end.
        let m = message(&lie(|h| h["c"]["data_offsets"] = serde_json::json!([32, 4000])));
        assert!(m.contains("tensor c") && m.contains("past the end"), "{m}");
        // A header length larger than the file.
        let mut file = valid();
        let twice = file.len() as u64 * 2;
        file[..8].copy_from_slice(&twice.to_le_bytes());
        assert!(message(&file).contains("runs past the end"), "{}", message(&file));
        file[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(message(&file).contains("runs past the end"), "{}", message(&file));
    }

    #[test]
    fn non_finite_weights_are_named() {
        for (dtype, nan, inf) in [
            (Dtype::F32, f32::NAN.to_le_bytes().to_vec(), f32::NEG_INFINITY.to_le_bytes().to_vec()),
            (Dtype::F16, f16::NAN.to_le_bytes().to_vec(), f16::INFINITY.to_le_bytes().to_vec()),
            (Dtype::BF16, bf16::NAN.to_le_bytes().to_vec(), bf16::NEG_INFINITY.to_le_bytes().to_vec()),
        ] {
            let zero = vec![0u8; nan.len()];
            let dir = tempfile::tempdir().unwrap();
            let bad: Vec<u8> = [&zero[..], &zero, &nan, &zero].concat();
            let worse: Vec<u8> = [&zero[..], &inf, &nan, &inf].concat();
            let good: Vec<u8> = [&zero[..], &zero, &zero, &zero].concat();
            let views = [
                ("bad", safetensors::tensor::TensorView::new(dtype, vec![2, 2], &bad).unwrap()),
                ("worse", safetensors::tensor::TensorView::new(dtype, vec![4], &worse).unwrap()),
                ("good", safetensors::tensor::TensorView::new(dtype, vec![4], &good).unwrap()),
            ];
            safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
            let store = TensorStore::open(dir.path()).unwrap();
            let err = store.f32("bad", &[2, 2]).unwrap_err();
            assert!(
                matches!(&err, Error::NonFiniteWeight { name, index: 2, value, .. } if name == "bad" && value.is_nan())
            );
            assert!(err.to_string().contains("tensor bad") && err.to_string().contains("model.safetensors"), "{err}");
            let err = store.f32("worse", &[4]).unwrap_err();
            assert!(matches!(&err, Error::NonFiniteWeight { index: 1, value, .. } if value.is_infinite()), "{err}");
            assert_eq!(store.f32("good", &[4]).unwrap(), vec![0.0; 4]);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let file = valid();
        assert_eq!(safetensors_entries(Path::new("w"), &file).unwrap().len(), 3);
        for end in 0..file.len() {
            assert!(safetensors_entries(Path::new("w"), &file[..end]).is_err(), "cut at {end} accepted");
        }
    }

    /// Never a panic; what is accepted lies inside the file and matches its dtype and shape.
    fn total(file: &[u8]) -> std::result::Result<(), TestCaseError> {
        if let Ok(found) = safetensors_entries(Path::new("w"), file) {
            for (_, l) in found {
                prop_assert!(l.start <= l.end && l.end <= file.len());
                let bits = l.shape.iter().product::<usize>() * l.dtype.bitsize();
                prop_assert_eq!(bits, (l.end - l.start) * 8);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::proptest_cases::config(1000))]

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
            total(&data)?;
        }

        #[test]
        fn arbitrary_headers_never_panic(header in "\\{(\"[abc]\": ?\\{\"dtype\": ?\"(F32|F16|BF16|U8|F4|I64|X)\", ?\"shape\": ?\\[([0-9]{1,20}, ?){0,3}\\], ?\"data_offsets\": ?\\[[0-9]{1,20}, ?[0-9]{1,20}\\]\\},? ?){0,3}\\}", data in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut file = (header.len() as u64).to_le_bytes().to_vec();
            file.extend(header.as_bytes());
            file.extend(data);
            total(&file)?;
        }

        #[test]
        fn flipped_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
            let mut file = valid();
            for (at, byte) in flips {
                let i = at.index(file.len());
                file[i] = byte;
            }
            total(&file)?;
        }

        #[test]
        fn huge_length_fields_never_panic(len in prop::sample::select(vec![u64::MAX, u64::MAX / 2, 1 << 32, 100_000_001])) {
            let mut file = valid();
            file[..8].copy_from_slice(&len.to_le_bytes());
            total(&file)?;
        }
    }
}
