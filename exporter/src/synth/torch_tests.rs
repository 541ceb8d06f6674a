//! Reading PyTorch `.bin` checkpoints written by this writer (the layout `torch.save`
//! writes, see `synth/torch_bin.rs`), and refusing the ones that are broken or would run code.
#![allow(clippy::unwrap_used)]
use std::path::Path;

use half::{bf16, f16};
use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, TensorStore, WeightsFormat};
use crate::error::Error;
use crate::synth::torch_bin::{PickledTensor, state_dict_pickle, write_archive, write_sharded, write_state_dict};
use crate::synth::{Preset, SynthSpec, synthesize};

const VALUES: [f32; 6] = [1.0, -2.5, 0.333, 1e-3, 65504.0, -0.0];

fn bytes(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn rounded(dtype: Dtype, values: &[f32]) -> Vec<f32> {
    match dtype {
        Dtype::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        Dtype::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => values.to_vec(),
    }
}

fn open_err(dir: &Path) -> Error {
    match TensorStore::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn reads_f32_f16_and_bf16_tensors_exactly() {
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![
            ("a.weight".to_string(), vec![2, 3], bytes(dtype, &VALUES)),
            ("b.bias".to_string(), vec![6], bytes(dtype, &VALUES)),
            ("scalar".to_string(), vec![], bytes(dtype, &VALUES[1..2])),
        ];
        write_state_dict(&dir.path().join("pytorch_model.bin"), &tensors, dtype).unwrap();
        let store = TensorStore::open(dir.path()).unwrap();
        assert_eq!(store.format(), WeightsFormat::TorchBin);
        assert_eq!(store.f32("a.weight", &[2, 3]).unwrap(), rounded(dtype, &VALUES), "{dtype:?}");
        assert_eq!(store.f32("b.bias", &[6]).unwrap(), rounded(dtype, &VALUES), "{dtype:?}");
        assert_eq!(store.f32("scalar", &[]).unwrap(), rounded(dtype, &VALUES[1..2]));
        assert_eq!(store.shape("a.weight"), Some(&[2, 3][..]));
        assert!(matches!(store.f32("a.weight", &[3, 2]), Err(Error::TensorShape { .. })));
    }
}

/// Tensors viewing one storage at offsets, as tied or sliced parameters are saved.
#[test]
fn honours_storage_offsets_and_shared_storages() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let t = |name, offset, shape: &'static [usize], stride: &'static [usize]| PickledTensor {
        name,
        key: "7",
        dtype: Dtype::F32,
        numel: 10,
        offset,
        shape,
        stride,
    };
    let records = [t("head", 0, &[2, 3], &[3, 1]), t("tail", 6, &[4], &[1]), t("mid", 3, &[1, 3], &[9, 1])];
    let data = bytes(Dtype::F32, &storage);
    write_archive(&dir.path().join("pytorch_model.bin"), &state_dict_pickle(&records), &[("7", &data)], false).unwrap();
    let store = TensorStore::open(dir.path()).unwrap();
    assert_eq!(store.f32("head", &[2, 3]).unwrap(), storage[..6]);
    assert_eq!(store.f32("tail", &[4]).unwrap(), storage[6..]);
    assert_eq!(store.f32("mid", &[1, 3]).unwrap(), storage[3..6]);
}

#[test]
fn refuses_non_contiguous_strides_and_views_past_the_storage() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(Dtype::F32, &VALUES);
    let t = |offset, stride: &'static [usize]| PickledTensor {
        name: "w",
        key: "0",
        dtype: Dtype::F32,
        numel: 6,
        offset,
        shape: &[2, 3],
        stride,
    };
    let path = dir.path().join("pytorch_model.bin");
    write_archive(&path, &state_dict_pickle(&[t(0, &[1, 2])]), &[("0", &data)], false).unwrap();
    let message = open_err(dir.path()).to_string();
    assert!(message.contains("tensor w") && message.contains("not contiguous"), "{message}");
    write_archive(&path, &state_dict_pickle(&[t(1, &[3, 1])]), &[("0", &data)], false).unwrap();
    let message = open_err(dir.path()).to_string();
    assert!(message.contains("past the end of its storage"), "{message}");
}

#[test]
fn reads_zip64_archives() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(Dtype::F32, &VALUES);
    let record =
        PickledTensor { name: "w", key: "0", dtype: Dtype::F32, numel: 6, offset: 0, shape: &[6], stride: &[1] };
    write_archive(&dir.path().join("pytorch_model.bin"), &state_dict_pickle(&[record]), &[("0", &data)], true).unwrap();
    let store = TensorStore::open(dir.path()).unwrap();
    assert_eq!(store.f32("w", &[6]).unwrap(), VALUES);
}

#[test]
fn reads_sharded_checkpoints_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<_> =
        (0..5).map(|i| (format!("layers.{i}.weight"), vec![6], bytes(Dtype::BF16, &VALUES))).collect();
    write_sharded(dir.path(), tensors, Dtype::BF16, 2).unwrap();
    assert!(dir.path().join("pytorch_model-00002-of-00002.bin").is_file());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("pytorch_model.bin.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["weight_map"]["layers.0.weight"], "pytorch_model-00001-of-00002.bin");
    assert_eq!(index["weight_map"]["layers.4.weight"], "pytorch_model-00002-of-00002.bin");
    let store = TensorStore::open(dir.path()).unwrap();
    for i in 0..5 {
        assert_eq!(store.f32(&format!("layers.{i}.weight"), &[6]).unwrap(), rounded(Dtype::BF16, &VALUES));
    }
    assert_eq!(store.dominant_dtype(), "bf16");
}

#[test]
fn an_index_naming_a_missing_shard_is_an_error_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![("a".to_string(), vec![6], bytes(Dtype::F32, &VALUES))];
    write_sharded(dir.path(), tensors, Dtype::F32, 1).unwrap();
    let index = dir.path().join("pytorch_model.bin.index.json");
    let text = std::fs::read_to_string(&index).unwrap().replace("00001-of-00001", "00009-of-00009");
    std::fs::write(&index, text).unwrap();
    match open_err(dir.path()) {
        Error::MissingShard { shard, index: named } => {
            assert!(shard.ends_with("pytorch_model-00009-of-00009.bin"));
            assert_eq!(named, index);
        }
        other => panic!("{other}"),
    }
}

/// The classic pickle exploit: `posix.system("touch MARKER")` via GLOBAL + REDUCE. It must be
/// refused by name, and the marker must not appear.
#[test]
fn refuses_a_pickle_that_would_run_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let command = format!("touch {}", marker.display());
    let mut pickle = vec![0x80, 2];
    pickle.extend(b"cposix\nsystem\n");
    pickle.push(b'X');
    pickle.extend((command.len() as u32).to_le_bytes());
    pickle.extend(command.as_bytes());
    pickle.extend([0x85, b'R', b'.']);
    let path = dir.path().join("pytorch_model.bin");
    write_archive(&path, &pickle, &[], false).unwrap();
    match open_err(dir.path()) {
        Error::UnsafePickle { path: named, global } => {
            assert_eq!(global, "posix.system");
            assert_eq!(named, path);
        }
        other => panic!("{other}"),
    }
    assert!(!marker.exists());
    let message = open_err(dir.path()).to_string();
    assert!(message.contains("posix.system") && message.contains("pytorch_model.bin"), "{message}");
}

/// The same through protocol 4's STACK_GLOBAL (`builtins.eval`), hidden after a valid tensor.
#[test]
fn refuses_stack_globals_outside_the_allow_list() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(Dtype::F32, &VALUES);
    let record =
        PickledTensor { name: "w", key: "0", dtype: Dtype::F32, numel: 6, offset: 0, shape: &[6], stride: &[1] };
    let mut pickle = state_dict_pickle(&[record]);
    pickle.pop(); // STOP
    pickle.extend([0x8c, 8]);
    pickle.extend(b"builtins");
    pickle.extend([0x8c, 4]);
    pickle.extend(b"eval");
    pickle.extend([0x93, b'.']);
    write_archive(&dir.path().join("pytorch_model.bin"), &pickle, &[("0", &data)], false).unwrap();
    assert!(matches!(open_err(dir.path()), Error::UnsafePickle { global, .. } if global == "builtins.eval"));
}

#[test]
fn a_truncated_archive_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    let tensors = vec![("a".to_string(), vec![6], bytes(Dtype::F32, &VALUES))];
    write_state_dict(&path, &tensors, Dtype::F32).unwrap();
    let full = std::fs::read(&path).unwrap();
    for keep in [full.len() / 2, full.len() - 10, 0] {
        std::fs::write(&path, &full[..keep]).unwrap();
        match open_err(dir.path()) {
            Error::TorchCheckpoint { path: named, message } => {
                assert_eq!(named, path);
                assert!(message.contains("truncated"), "{keep} bytes: {message}");
            }
            other => panic!("{keep} bytes: {other}"),
        }
    }
}

#[test]
fn a_compressed_entry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    let tensors = vec![("a".to_string(), vec![6], bytes(Dtype::F32, &VALUES))];
    write_state_dict(&path, &tensors, Dtype::F32).unwrap();
    let mut file = std::fs::read(&path).unwrap();
    let central = file.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    file[central + 10] = 8; // deflate, in data.pkl's directory entry
    std::fs::write(&path, file).unwrap();
    let message = open_err(dir.path()).to_string();
    assert!(message.contains("archive/data.pkl is compressed"), "{message}");
}

#[test]
fn prefers_safetensors_when_both_formats_are_present() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec::preset(Preset::Tiny);
    synthesize(&spec, dir.path()).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not even a zip").unwrap();
    assert_eq!(TensorStore::open(dir.path()).unwrap().format(), WeightsFormat::Safetensors);
}

/// `synth --weights-format bin` writes the original layout as two `.bin` shards, and the
/// checkpoint opens with the same weights as its safetensors twin.
#[test]
fn synthesized_bin_shards_match_the_safetensors_checkpoint() {
    let base =
        SynthSpec { layout: vl_runtime::manifest::CheckpointLayout::Original, ..SynthSpec::preset(Preset::Tiny) };
    let (st, bin) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synthesize(&base, st.path()).unwrap();
    synthesize(&SynthSpec { weights_format: WeightsFormat::TorchBin, ..base }, bin.path()).unwrap();
    assert!(!bin.path().join("model.safetensors").exists());
    assert!(bin.path().join("pytorch_model.bin.index.json").is_file());
    let (a, b) = (Checkpoint::open(st.path()).unwrap(), Checkpoint::open(bin.path()).unwrap());
    assert_eq!(b.store.format(), WeightsFormat::TorchBin);
    assert_eq!(a.roots.video_tower, b.roots.video_tower);
    let h = base.vision_hidden;
    let name = format!("{}encoder.layers.0.temporal_attn.q_proj.weight", b.roots.video_tower);
    assert_eq!(a.store.f32(&name, &[h, h]).unwrap(), b.store.f32(&name, &[h, h]).unwrap());
    let head = format!("{}weight", b.roots.lm_head);
    let shape = a.store.shape(&head).unwrap().to_vec();
    assert_eq!(a.store.f32(&head, &shape).unwrap(), b.store.f32(&head, &shape).unwrap());
}
