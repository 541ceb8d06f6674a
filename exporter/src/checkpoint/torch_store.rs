//! The tensors of one memory-mapped PyTorch `.bin` (zip) checkpoint: the pickle is read by the
//! restricted unpickler, and each tensor becomes a byte range of its storage's zip entry.
use std::collections::HashMap;
use std::path::Path;

use super::shards::Located;
use super::torch_pickle::{self, PickleError, TensorRecord};
use super::torch_zip::{self, STORED, ZipEntry};
use crate::error::{Error, Result};

/// Whether `stride` lays `shape` out row-major without gaps (dims of size 1 may have any stride).
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&dim, &s) in shape.iter().zip(stride).rev() {
        if dim != 1 && s != expected {
            return false;
        }
        // Saturating: a shape too large to address fails on its size in `locate`, not here.
        expected = expected.saturating_mul(dim);
    }
    true
}

/// Every tensor of the torch zip checkpoint `file` (the bytes of `path`), by name.
pub(super) fn read(path: &Path, file: &[u8]) -> Result<Vec<(String, Located)>> {
    let bad = |message: String| Error::TorchCheckpoint { path: path.to_path_buf(), message };
    let entries = torch_zip::entries(file).map_err(bad)?;
    let pickle = entries
        .iter()
        .find(|e| e.name.ends_with("data.pkl") && e.name.matches('/').count() == 1)
        .ok_or_else(|| bad("no <archive>/data.pkl entry: not a torch.save zip checkpoint".into()))?;
    let prefix = &pickle.name[..pickle.name.len() - "data.pkl".len()];
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    if let Some(order) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let order = &file[order.data.clone()];
        if order != b"little" {
            return Err(bad(format!(
                "byteorder {:?}: only little-endian checkpoints are read",
                String::from_utf8_lossy(order)
            )));
        }
    }
    let stored = |e: &ZipEntry| {
        if e.method == STORED {
            Ok(e.data.clone())
        } else {
            Err(bad(format!(
                "entry {} is compressed (method {}); torch.save stores entries uncompressed",
                e.name, e.method
            )))
        }
    };
    let records = torch_pickle::state_dict(&file[stored(pickle)?]).map_err(|e| match e {
        PickleError::Refused(global) => Error::UnsafePickle { path: path.to_path_buf(), global },
        PickleError::Malformed(m) => bad(format!("{}: {m}", pickle.name)),
    })?;
    let mut out = Vec::with_capacity(records.len());
    for (name, record) in records {
        let entry = by_name.get(format!("{prefix}data/{}", record.key).as_str()).ok_or_else(|| {
            bad(format!("tensor {name}: its storage {prefix}data/{} is not in the archive", record.key))
        })?;
        let located = locate(&name, &record, stored(entry)?).map_err(bad)?;
        out.push((name, located));
    }
    Ok(out)
}

/// The byte range of the tensor `record` inside its storage's `data` range.
fn locate(name: &str, record: &TensorRecord, data: std::ops::Range<usize>) -> Result<Located, String> {
    let TensorRecord { dtype, offset, shape, stride, .. } = record;
    if !is_contiguous(shape, stride) {
        return Err(format!(
            "tensor {name} has strides {stride:?} for shape {shape:?}: not contiguous (save it after .contiguous())"
        ));
    }
    let width = (dtype.bitsize() / 8).max(1);
    let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let range = numel.and_then(|n| {
        let start = data.start.checked_add(offset.checked_mul(width)?)?;
        Some((start, start.checked_add(n.checked_mul(width)?)?))
    });
    match range {
        Some((start, end)) if end <= data.end => Ok(Located { dtype: *dtype, shape: shape.clone(), start, end }),
        _ => Err(format!(
            "tensor {name} (shape {shape:?}, offset {offset}) runs past the end of its storage of {} bytes",
            data.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_ignores_strides_of_unit_dims() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[2, 1, 3], &[3, 7, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
    }

    #[test]
    fn shapes_too_large_to_address_are_errors() {
        // The running stride product overflowed (a panic with overflow checks on).
        let record = TensorRecord {
            key: "0".into(),
            dtype: safetensors::Dtype::F32,
            offset: 0,
            shape: vec![1 << 40, 1 << 40, 2],
            stride: vec![1 << 41, 2, 1],
        };
        let err = locate("w", &record, 100..200).err().unwrap_or_default();
        assert!(err.contains("tensor w") && err.contains("runs past"), "{err}");
        let record = TensorRecord { offset: usize::MAX / 2, shape: vec![2], stride: vec![1], ..record };
        assert!(locate("w", &record, 100..200).is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::synth::torch_bin::write_state_dict;

        /// The bytes of a valid two-tensor `torch.save` zip.
        fn valid() -> Vec<u8> {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("pytorch_model.bin");
            let tensors =
                vec![("a.weight".to_string(), vec![2, 3], vec![7u8; 24]), ("b".to_string(), vec![], vec![1u8; 4])];
            write_state_dict(&path, &tensors, safetensors::Dtype::F32).expect("written");
            std::fs::read(&path).expect("read back")
        }

        /// Never a panic; what is accepted lies inside the file.
        fn total(file: &[u8]) -> std::result::Result<(), TestCaseError> {
            if let Ok(found) = read(Path::new("x.bin"), file) {
                for (_, l) in found {
                    prop_assert!(l.start <= l.end && l.end <= file.len());
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(crate::proptest_cases::config(500))]

            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
                total(&data)?;
            }

            #[test]
            fn flipped_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
                let mut data = valid();
                for (at, byte) in flips {
                    let i = at.index(data.len());
                    data[i] = byte;
                }
                total(&data)?;
            }

            #[test]
            fn huge_fields_never_panic(at in any::<prop::sample::Index>(), width in 2usize..=8, fill in prop::sample::select(vec![0xFFu8, 0x7F, 0x80])) {
                // All-ones (or nearly) written over any 2 to 8 bytes: sizes, offsets, counts.
                let mut data = valid();
                let i = at.index(data.len() - width);
                data[i..i + width].fill(fill);
                total(&data)?;
            }
        }

        #[test]
        fn the_valid_zip_reads_and_every_truncation_is_an_error() {
            let data = valid();
            assert_eq!(read(Path::new("x.bin"), &data).expect("valid").len(), 2);
            for end in 0..data.len() {
                assert!(read(Path::new("x.bin"), &data[..end]).is_err(), "cut at {end} of {} accepted", data.len());
            }
        }
    }
}
