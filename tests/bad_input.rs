//! Bad input to `vl_export::export::build`: every broken checkpoint or destination gets an `Err` of
//! the right kind whose message names the file or tensor concerned, the exporter never panics, and
//! nothing is left half-written (no output directory, no `.vl-export-*` staging directory).
//! Each case synthesizes a valid tiny checkpoint in a temp dir and then breaks it.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use vl_export::Error;
use vl_export::export::{BuildOptions, BuildReport, build};
use vl_export::synth::{Preset, SynthSpec, WeightDtype, synthesize};
use vl_runtime::manifest::{MANIFEST_FILE, Manifest};

const WEIGHTS: &str = "model.safetensors";
const DROPPED: &str = "language_model.model.layers.1.mlp.up_proj.weight";
const RESHAPED: &str = "language_model.model.layers.0.mlp.down_proj.weight";

/// A temp dir holding a valid tiny checkpoint at `ckpt`; the engine is to go to `out`.
struct Scene {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ckpt: PathBuf,
    out: PathBuf,
}

fn scene_with(spec: &SynthSpec) -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let ckpt = root.join("ckpt");
    synthesize(spec, &ckpt).unwrap();
    Scene { out: root.join("engine"), ckpt, root, _dir: dir }
}

fn scene() -> Scene {
    scene_with(&SynthSpec::preset(Preset::Tiny))
}

/// Runs the exporter, turning a panic into a test failure that says so.
fn run(ckpt: &Path, out: &Path) -> Result<BuildReport, Error> {
    let opts = BuildOptions::new(ckpt.to_path_buf(), out.to_path_buf());
    std::panic::catch_unwind(|| build(&opts)).unwrap_or_else(|_| panic!("the exporter panicked on {}", ckpt.display()))
}

/// Names in `dir` that look like the exporter's staging directories.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".vl-export-"))
        .collect()
}

/// Exports `s.ckpt` to `s.out` expecting failure; checks the message names every one of `names`
/// and that nothing was written.
fn fails(s: &Scene, names: &[&str]) -> Error {
    let err = match run(&s.ckpt, &s.out) {
        Ok(_) => panic!("export of a broken checkpoint succeeded"),
        Err(e) => e,
    };
    let msg = err.to_string();
    eprintln!("{msg}");
    for name in names {
        assert!(msg.contains(name), "error {msg:?} does not name {name:?}");
    }
    assert!(!s.out.exists(), "{} exists after a failed export ({msg})", s.out.display());
    assert_eq!(leftovers(&s.root), Vec::<String>::new(), "staging left behind after: {msg}");
    err
}

/// One tensor read out of a file, owned.
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| (name, Tensor { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }))
        .collect()
}

fn write_tensors<'a>(path: &Path, tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>) {
    let views: Vec<(&String, safetensors::tensor::TensorView<'_>)> = tensors
        .into_iter()
        .map(|(n, t)| (n, safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// `model.safetensors` as its 8-byte length, JSON header and data.
fn split_file(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

fn join_file(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let header = serde_json::to_vec(header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Every file of `dir` with its hash.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), sha256(&e.path()))
        })
        .collect()
}

/// The external data hashes of the four graphs.
fn data_hashes(m: &Manifest) -> Vec<String> {
    let g = &m.graphs;
    [&g.vision, &g.image, &g.embed, &g.decoder].iter().map(|e| e.data.as_ref().unwrap().sha256.clone()).collect()
}

#[test]
fn missing_config() {
    let s = scene();
    std::fs::remove_file(s.ckpt.join("config.json")).unwrap();
    assert!(matches!(fails(&s, &["config.json"]), Error::Io { .. }));
}

#[test]
fn config_not_json() {
    let s = scene();
    std::fs::write(s.ckpt.join("config.json"), "{\"architectures\": [\"VideoLlava").unwrap();
    assert!(matches!(fails(&s, &["config.json"]), Error::Config { .. }));
}

#[test]
fn unknown_architecture() {
    let s = scene();
    let path = s.ckpt.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["BertModel"]);
    config["model_type"] = serde_json::json!("bert");
    std::fs::write(&path, config.to_string()).unwrap();
    assert!(matches!(fails(&s, &["config.json", "BertModel"]), Error::UnknownArchitecture { .. }));
}

#[test]
fn missing_tensor() {
    let s = scene();
    let path = s.ckpt.join(WEIGHTS);
    let tensors = read_tensors(&path);
    assert!(tensors.contains_key(DROPPED));
    write_tensors(&path, tensors.iter().filter(|(n, _)| n.as_str() != DROPPED));
    assert!(matches!(fails(&s, &[DROPPED]), Error::MissingTensor { .. }));
}

#[test]
fn tensor_with_wrong_shape() {
    let s = scene();
    let path = s.ckpt.join(WEIGHTS);
    let mut tensors = read_tensors(&path);
    tensors.get_mut(RESHAPED).unwrap().shape.reverse();
    write_tensors(&path, &tensors);
    assert!(matches!(fails(&s, &[RESHAPED]), Error::TensorShape { .. }));
}

#[test]
fn tensor_with_unsupported_dtype() {
    let s = scene();
    let path = s.ckpt.join(WEIGHTS);
    let mut tensors = read_tensors(&path);
    tensors.get_mut(RESHAPED).unwrap().dtype = Dtype::I32;
    write_tensors(&path, &tensors);
    assert!(matches!(fails(&s, &[RESHAPED, "I32"]), Error::UnsupportedDtype { .. }));
}

#[test]
fn truncated_safetensors() {
    let s = scene();
    let path = s.ckpt.join(WEIGHTS);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = fails(&s, &[WEIGHTS, "truncated"]);
    assert!(matches!(err, Error::Safetensors { .. }));
}

#[test]
fn empty_and_garbage_safetensors() {
    let s = scene();
    let path = s.ckpt.join(WEIGHTS);
    for bytes in [&b""[..], b"1234", &[0xff; 64], b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"] {
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(fails(&s, &[WEIGHTS]), Error::Safetensors { .. }), "{bytes:?}");
    }
}

#[test]
fn offsets_past_the_end() {
    let s = scene();
    let path = s.ckpt.join(WEIGHTS);
    let (mut header, data) = split_file(&path);
    let offsets = &mut header[RESHAPED]["data_offsets"];
    let len = (offsets[1].as_u64().unwrap() - offsets[0].as_u64().unwrap()) as usize;
    let start = data.len() + 4096;
    *offsets = serde_json::json!([start, start + len]);
    join_file(&path, &header, &data);
    let err = fails(&s, &[WEIGHTS, RESHAPED]);
    assert!(matches!(err, Error::Safetensors { .. }));

    // The last tensor grown past the end: offsets stay contiguous, the size disagrees.
    let s = scene();
    let (mut header, data) = split_file(&s.ckpt.join(WEIGHTS));
    let last = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(k, _)| k.clone())
        .unwrap();
    let end = header[&last]["data_offsets"][1].as_u64().unwrap();
    header[&last]["data_offsets"][1] = serde_json::json!(end + 1_000_000);
    join_file(&s.ckpt.join(WEIGHTS), &header, &data);
    assert!(matches!(fails(&s, &[WEIGHTS, &last]), Error::Safetensors { .. }));
}

#[test]
fn non_finite_weights_are_named() {
    let s = scene();
    let path = s.ckpt.join(WEIGHTS);
    let mut tensors = read_tensors(&path);
    let t = tensors.get_mut(RESHAPED).unwrap();
    assert_eq!(t.dtype, Dtype::F32);
    t.data[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    write_tensors(&path, &tensors);
    let err = fails(&s, &[WEIGHTS, RESHAPED, "NaN", "element 10"]);
    assert!(matches!(err, Error::NonFiniteWeight { index: 10, .. }), "{err:?}");
}

#[test]
fn config_with_wrong_types_or_impossible_dimensions() {
    for (section, field, value, wrong_type) in [
        ("text_config", "hidden_size", serde_json::json!("64"), true),
        ("vision_config", "num_attention_heads", serde_json::json!(2.5), true),
        ("text_config", "num_attention_heads", serde_json::json!(5), false),
        ("vision_config", "num_attention_heads", serde_json::json!(0), false),
    ] {
        let s = scene();
        let path = s.ckpt.join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[section][field] = value;
        std::fs::write(&path, config.to_string()).unwrap();
        let err = fails(&s, &["config.json", field]);
        if wrong_type {
            assert!(matches!(err, Error::ConfigType { .. }), "{err:?}");
        } else {
            assert!(matches!(err, Error::ConfigDims { .. }), "{err:?}");
        }
    }
}

#[test]
fn out_parent_is_a_file() {
    let s = scene();
    let file = s.root.join("plain-file");
    std::fs::write(&file, "not a directory").unwrap();
    let err = run(&s.ckpt, &file.join("engine")).unwrap_err();
    assert!(err.to_string().contains("plain-file"), "{err}");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
    assert_eq!(leftovers(&s.root), Vec::<String>::new());
}

#[test]
fn out_is_a_file() {
    let s = scene();
    std::fs::write(&s.out, "keep me").unwrap();
    let err = run(&s.ckpt, &s.out).unwrap_err();
    assert!(err.to_string().contains(&*s.out.to_string_lossy()), "{err}");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert_eq!(std::fs::read_to_string(&s.out).unwrap(), "keep me");
    assert_eq!(leftovers(&s.root), Vec::<String>::new());
}

#[test]
fn out_cannot_be_created() {
    // Fails as root too: nothing may create directories under /proc.
    let s = scene();
    let out = Path::new("/proc/vl-export-bad-input/engine");
    let err = run(&s.ckpt, out).unwrap_err();
    assert!(err.to_string().contains("/proc/vl-export-bad-input"), "{err}");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(!out.exists());
}

#[test]
fn out_is_a_foreign_directory() {
    let s = scene();
    std::fs::create_dir(&s.out).unwrap();
    std::fs::write(s.out.join("thesis.tex"), "years of work").unwrap();
    std::fs::create_dir(s.out.join("figures")).unwrap();
    let err = run(&s.ckpt, &s.out).unwrap_err();
    assert!(err.to_string().contains(&*s.out.to_string_lossy()), "{err}");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert_eq!(std::fs::read_to_string(s.out.join("thesis.tex")).unwrap(), "years of work");
    assert!(s.out.join("figures").is_dir());
    assert_eq!(std::fs::read_dir(&s.out).unwrap().count(), 2);
    assert_eq!(leftovers(&s.root), Vec::<String>::new());
}

#[test]
fn existing_engine_replaced_on_success_kept_on_failure() {
    let s = scene();
    let first = run(&s.ckpt, &s.out).unwrap();
    let before = snapshot(&s.out);

    // A different checkpoint replaces the engine as a whole.
    let other = s.root.join("other-ckpt");
    synthesize(&SynthSpec { seed: 7, ..SynthSpec::preset(Preset::Tiny) }, &other).unwrap();
    std::fs::write(s.out.join("stale.txt"), "from the old engine").unwrap();
    let second = run(&other, &s.out).unwrap();
    assert_ne!(data_hashes(&first.manifest), data_hashes(&second.manifest));
    assert_eq!(Manifest::load(&s.out).unwrap(), second.manifest);
    assert!(!s.out.join("stale.txt").exists(), "the old engine's files survived the replacement");
    assert_ne!(snapshot(&s.out), before);
    assert_eq!(leftovers(&s.root), Vec::<String>::new());

    // A failing export leaves the engine there exactly as it was.
    let manifest_before = std::fs::read(s.out.join(MANIFEST_FILE)).unwrap();
    let engine_before = snapshot(&s.out);
    let path = s.ckpt.join(WEIGHTS);
    let tensors = read_tensors(&path);
    write_tensors(&path, tensors.iter().filter(|(n, _)| n.as_str() != DROPPED));
    let err = run(&s.ckpt, &s.out).unwrap_err();
    assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
    assert_eq!(std::fs::read(s.out.join(MANIFEST_FILE)).unwrap(), manifest_before);
    assert_eq!(snapshot(&s.out), engine_before);
    assert_eq!(leftovers(&s.root), Vec::<String>::new());
}

#[test]
fn missing_tokenizer() {
    let s = scene();
    std::fs::remove_file(s.ckpt.join("tokenizer.json")).unwrap();
    assert!(matches!(fails(&s, &["tokenizer.json"]), Error::Invalid(_)));
}

#[test]
fn missing_weights() {
    let s = scene();
    std::fs::remove_file(s.ckpt.join(WEIGHTS)).unwrap();
    assert!(matches!(fails(&s, &[WEIGHTS]), Error::Invalid(_)));
}

#[test]
fn model_dir_missing() {
    let s = scene();
    std::fs::remove_dir_all(&s.ckpt).unwrap();
    assert!(matches!(fails(&s, &["ckpt"]), Error::Invalid(_)));
}

/// Splits `model.safetensors` into two shards with an index, the way transformers saves them.
fn shard(ckpt: &Path) -> [String; 2] {
    let single = ckpt.join(WEIGHTS);
    let tensors = read_tensors(&single);
    let names = ["model-00001-of-00002.safetensors".to_string(), "model-00002-of-00002.safetensors".to_string()];
    let half = tensors.len() / 2;
    write_tensors(&ckpt.join(&names[0]), tensors.iter().take(half));
    write_tensors(&ckpt.join(&names[1]), tensors.iter().skip(half));
    let weight_map: serde_json::Map<String, serde_json::Value> = tensors
        .keys()
        .enumerate()
        .map(|(i, n)| (n.clone(), serde_json::json!(names[usize::from(i >= half)])))
        .collect();
    let total: usize = tensors.values().map(|t| t.data.len()).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(ckpt.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(single).unwrap();
    names
}

#[test]
fn sharded_checkpoint_matches_single_file() {
    let s = scene();
    let single = run(&s.ckpt, &s.out).unwrap();
    let sharded_ckpt = s.root.join("sharded");
    synthesize(&SynthSpec::preset(Preset::Tiny), &sharded_ckpt).unwrap();
    shard(&sharded_ckpt);
    let sharded = run(&sharded_ckpt, &s.root.join("sharded-engine")).unwrap();
    assert_eq!(data_hashes(&single.manifest), data_hashes(&sharded.manifest));
    assert_eq!(single.manifest.graphs, sharded.manifest.graphs);
    assert_eq!(leftovers(&s.root), Vec::<String>::new());
}

#[test]
fn sharded_checkpoint_missing_shard() {
    let s = scene();
    let names = shard(&s.ckpt);
    std::fs::remove_file(s.ckpt.join(&names[1])).unwrap();
    assert!(matches!(fails(&s, &[&names[1], "model.safetensors.index.json"]), Error::MissingShard { .. }));
}

#[test]
fn sharded_checkpoint_bad_index() {
    let s = scene();
    shard(&s.ckpt);
    let index = s.ckpt.join("model.safetensors.index.json");
    std::fs::write(&index, "{\"weight_map\": ").unwrap();
    assert!(matches!(fails(&s, &["model.safetensors.index.json"]), Error::Config { .. }));
    std::fs::write(&index, "{\"metadata\": {}}").unwrap();
    assert!(matches!(fails(&s, &["model.safetensors.index.json", "weight_map"]), Error::Config { .. }));
}

#[test]
fn half_precision_checkpoints_export() {
    for (dtype, name) in [(WeightDtype::Bf16, "bf16"), (WeightDtype::F16, "f16")] {
        let s = scene_with(&SynthSpec { dtype, ..SynthSpec::preset(Preset::Tiny) });
        let report = run(&s.ckpt, &s.out).unwrap();
        assert_eq!(report.manifest.source.weight_dtype, name);
        assert_eq!(Manifest::load(&s.out).unwrap(), report.manifest);
        assert_eq!(leftovers(&s.root), Vec::<String>::new());
    }
}

#[test]
fn replacement_ignores_foreign_staging_names() {
    // What an export running alongside in this process (or a crashed one with a reused pid) could
    // leave beside the engine; it must neither block the replacement nor be touched by it.
    let s = scene();
    run(&s.ckpt, &s.out).unwrap();
    let foreign = s.root.join(format!(".vl-export-old-{}", std::process::id()));
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("manifest.yaml"), "someone else's").unwrap();
    run(&s.ckpt, &s.out).unwrap();
    assert_eq!(std::fs::read_to_string(foreign.join("manifest.yaml")).unwrap(), "someone else's");
    std::fs::remove_dir_all(&foreign).unwrap();
    assert_eq!(leftovers(&s.root), Vec::<String>::new());
}
