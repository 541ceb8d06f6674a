//! The library API of vl-runtime on the tiny fixture engine: concurrent conversations,
//! follow-ups that reuse the KV cache, the visual feature cache, context checks, engine
//! integrity, cancellation and leaks, image input, stop strings and the video decode limit.
//!
//! Goldens come from `tools/oracle.py goldens` (see tests/fixtures/tiny/README.md).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard};
use std::time::Duration;

use ndarray::{Array4, Array5};
use ndarray_npy::read_npy;
use serde_json::Value;
use vl_e2e::{built, fixture_dir};
use vl_runtime::manifest::Manifest;
use vl_runtime::sampling::SamplingParams;
use vl_runtime::video::{DecodeOptions, VideoError};
use vl_runtime::{Answer, Error, FinishReason, Flow, GenerateOptions, Media, Pipeline, PipelineOptions, Verify};

/// The RSS check must not see other tests' allocations: it runs alone (write lock), the
/// other tests share the read lock.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner())
}

fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        serde_json::from_str(&std::fs::read_to_string(fixture_dir("tiny").join("golden.json")).unwrap()).unwrap()
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| u32::try_from(x.as_u64().unwrap()).unwrap()).collect()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap()
}

fn engine() -> &'static Path {
    &built("tiny").engine
}

/// One pipeline shared by the tests that do not need a fresh one.
fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<Pipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| Pipeline::load(engine(), PipelineOptions::default()).unwrap())
}

fn video_pixels() -> Media {
    static PIXELS: OnceLock<Arc<Array5<f32>>> = OnceLock::new();
    let px = PIXELS.get_or_init(|| Arc::new(read_npy(fixture_dir("tiny").join("pixel_values_videos.npy")).unwrap()));
    Media::VideoPixels(px.clone())
}

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens, ignore_eos: true, ..GenerateOptions::default() }
}

fn ask(chat: &mut vl_runtime::Conversation<'_>, question: &str, opts: &GenerateOptions) -> Answer {
    chat.ask(question, opts, &mut |_| Flow::Continue).unwrap()
}

#[test]
fn pipeline_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pipeline>();
}

/// One conversation of the concurrency test: media, question, options.
fn request(i: usize) -> (String, GenerateOptions) {
    let g = golden();
    if i.is_multiple_of(2) {
        return (text(&g["prompt"]).to_string(), greedy(32));
    }
    let sampling = SamplingParams {
        temperature: 0.7 + 0.1 * i as f32,
        top_k: 50,
        top_p: 0.9,
        repetition_penalty: 1.1,
        seed: 1000 + i as u64,
        ..SamplingParams::default()
    };
    let question = ["Describe the video.", "What color is it?", "Who is there?", "Where is this?"][i / 2];
    (question.to_string(), GenerateOptions { sampling, max_new_tokens: 24, ignore_eos: true, ..Default::default() })
}

/// Two turns, so that concurrent follow-ups are covered too.
fn converse(p: &Pipeline, i: usize) -> Vec<Vec<u32>> {
    let (question, opts) = request(i);
    let mut chat = p.conversation(video_pixels()).unwrap();
    let first = ask(&mut chat, &question, &opts);
    let second = ask(&mut chat, "And then?", &GenerateOptions { max_new_tokens: 8, ..opts });
    vec![first.token_ids, second.token_ids]
}

#[test]
fn concurrent_conversations_match_sequential_ones() {
    let _guard = shared();
    let p = pipeline();
    let alone: Vec<_> = (0..8).map(|i| converse(p, i)).collect();
    assert_eq!(alone[0][0], ids(&golden()["greedy_tokens"]), "greedy run alone differs from the golden");
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|i| s.spawn(move || converse(p, i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "conversation {i} gives other tokens when run concurrently");
    }
}

#[test]
fn follow_up_reuses_the_kv_cache_and_matches_the_golden() {
    let _guard = shared();
    let g = golden();
    let mut chat = pipeline().conversation(video_pixels()).unwrap();
    let first = ask(&mut chat, text(&g["prompt"]), &greedy(32));
    assert_eq!(first.token_ids, ids(&g["greedy_tokens"]));
    // The last answer token is fed with the next turn.
    let after_first = chat.context_len();
    assert_eq!(after_first, ids(&g["input_ids"]).len() + first.token_ids.len() - 1);

    let turn2 = &g["second_turn"];
    let second = ask(&mut chat, text(&turn2["prompt"]), &greedy(32));
    assert_eq!(second.timings.vision_ms, 0.0, "turn 2 ran the vision graph");
    assert_eq!(second.timings.preprocess_ms, 0.0, "turn 2 preprocessed the media again");
    assert_eq!(second.token_ids, ids(&turn2["greedy_tokens"]), "turn 2 differs from the golden");
    let appended = ids(&turn2["appended_ids"]).len();
    assert_eq!(chat.context_len() - after_first, appended + second.token_ids.len(), "KV cache growth on turn 2");
    assert_eq!(chat.context_len(), ids(&turn2["input_ids"]).len() + second.token_ids.len() - 1);
}

#[test]
fn second_conversation_reuses_visual_features() {
    let _guard = shared();
    let p = Pipeline::load(engine(), PipelineOptions::default()).unwrap();
    let q = text(&golden()["prompt"]);
    let mut first = p.conversation(video_pixels()).unwrap();
    let a = ask(&mut first, q, &greedy(4));
    assert!(a.timings.vision_ms > 0.0, "a fresh pipeline must run the vision graph");
    let mut second = p.conversation(video_pixels()).unwrap();
    let b = ask(&mut second, q, &greedy(4));
    assert_eq!(b.timings.vision_ms, 0.0, "the second conversation about the same pixels ran the vision graph");
    assert_eq!(a.token_ids, b.token_ids);
    // An equal copy (another allocation) hits the cache too: the key is the content.
    let copy = Media::VideoPixels(Arc::new(match video_pixels() {
        Media::VideoPixels(px) => (*px).clone(),
        _ => unreachable!(),
    }));
    let c = ask(&mut p.conversation(copy).unwrap(), q, &greedy(4));
    assert_eq!(c.timings.vision_ms, 0.0, "equal pixel values in another buffer missed the cache");
}

fn long_question() -> String {
    let words = ["what", "does", "the", "horse", "on", "beach", "do", "next", "and", "why"];
    (0..600).map(|i| words[i % words.len()]).collect::<Vec<_>>().join(" ")
}

#[test]
fn context_overflow_is_an_error_before_any_work() {
    let _guard = shared();
    let p = pipeline();
    assert_eq!(p.manifest().max_sequence_length, 512);
    // A missing video: had anything been decoded, the error would be about the file.
    let mut chat = p.conversation(Media::VideoFile("/nonexistent/clip.mp4".into())).unwrap();
    let err = chat.ask(&long_question(), &greedy(8), &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { limit: 512, .. }), "{err:?}");
    assert_eq!(chat.context_len(), 0);

    let err = chat.ask("What is this?", &greedy(500), &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { max_new: 500, limit: 512, .. }), "{err:?}");

    // Nothing was spent: the same conversation still answers once the request fits.
    let mut chat = p.conversation(video_pixels()).unwrap();
    let err = chat.ask(text(&golden()["prompt"]), &greedy(400), &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { .. }), "{err:?}");
    assert_eq!(chat.context_len(), 0);
    let answer = ask(&mut chat, text(&golden()["prompt"]), &greedy(32));
    assert_eq!(answer.token_ids, ids(&golden()["greedy_tokens"]));

    // A follow-up that no longer fits is refused without touching the cache.
    let before = chat.context_len();
    let err = chat.ask("And then?", &greedy(512 - before), &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { .. }), "{err:?}");
    assert_eq!(chat.context_len(), before);
    let second = ask(&mut chat, text(&golden()["second_turn"]["prompt"]), &greedy(32));
    assert_eq!(second.token_ids, ids(&golden()["second_turn"]["greedy_tokens"]));
}

#[test]
fn a_decode_timeout_stops_ffmpeg_with_a_typed_error() {
    let _guard = shared();
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mp4");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v", "16"])
        .args(["-pix_fmt", "yuv420p"])
        .arg(&clip)
        .status()
        .expect("ffmpeg runs (make setup installs it)");
    assert!(status.success(), "ffmpeg could not write {}", clip.display());
    // Within the default limit the clip decodes.
    let mut chat = pipeline().conversation(Media::VideoFile(clip.clone())).unwrap();
    ask(&mut chat, "What is this?", &greedy(2));
    // A limit of 1 ms stops it: starting ffprobe alone takes longer.
    let decode = DecodeOptions { timeout: Duration::from_millis(1), ..DecodeOptions::default() };
    let p = Pipeline::load(engine(), PipelineOptions { decode, ..PipelineOptions::default() }).unwrap();
    let mut chat = p.conversation(Media::VideoFile(clip.clone())).unwrap();
    let err = chat.ask("What is this?", &greedy(2), &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::Video(VideoError::Timeout { .. })), "{err:?}");
    assert!(err.to_string().contains(&*clip.to_string_lossy()), "the error does not name the clip: {err}");
    assert_eq!(chat.context_len(), 0);
}

#[test]
fn a_failed_first_question_can_be_asked_again() {
    let _guard = shared();
    let p = pipeline();
    let mut chat = p.conversation(Media::VideoFile("/nonexistent/clip.mp4".into())).unwrap();
    for attempt in 0..2 {
        let err = chat.ask("What is this?", &greedy(4), &mut |_| Flow::Continue).unwrap_err();
        assert!(matches!(err, Error::Video(_)), "attempt {attempt}: {err:?}");
        assert!(err.to_string().contains("/nonexistent/clip.mp4"), "attempt {attempt}: {err}");
        assert_eq!(chat.context_len(), 0);
    }
    // Invalid options are refused before the video is touched.
    let bad = GenerateOptions { sampling: SamplingParams { temperature: -1.0, ..Default::default() }, ..greedy(4) };
    let err = chat.ask("What is this?", &bad, &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::Sampling(_)), "{err:?}");
    let bad = GenerateOptions { stop: vec![String::new()], ..greedy(4) };
    let err = chat.ask("What is this?", &bad, &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::Stream(_)), "{err:?}");

    // After a failed first question, the retry is still a first question about the video.
    let g = golden();
    let mut chat = p.conversation(video_pixels()).unwrap();
    let err = chat.ask(text(&g["prompt"]), &bad, &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::Stream(_)), "{err:?}");
    assert_eq!(ask(&mut chat, text(&g["prompt"]), &greedy(32)).token_ids, ids(&g["greedy_tokens"]));
    // A follow-up with invalid options leaves the conversation as it was.
    let err = chat.ask(text(&g["second_turn"]["prompt"]), &bad, &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, Error::Stream(_)), "{err:?}");
    let second = ask(&mut chat, text(&g["second_turn"]["prompt"]), &greedy(32));
    assert_eq!(second.token_ids, ids(&g["second_turn"]["greedy_tokens"]));
}

/// A copy of the engine directory that the test may alter.
fn engine_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(engine()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load(dir: &Path, verify: Verify) -> Result<Pipeline, Error> {
    Pipeline::load(dir, PipelineOptions { verify, ..PipelineOptions::default() })
}

#[test]
fn missing_graph_is_a_load_error_naming_it() {
    let _guard = shared();
    let dir = engine_copy();
    std::fs::remove_file(dir.path().join("decoder.onnx")).unwrap();
    let err = load(dir.path(), Verify::Cached).err().unwrap();
    assert!(err.to_string().contains("decoder.onnx"), "{err}");
    assert!(matches!(&err, Error::Io { path, .. } if path.ends_with("decoder.onnx")), "{err:?}");
}

fn flip_byte(path: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
}

fn assert_checksum_error(result: Result<Pipeline, Error>, file: &Path) {
    let err = result.err().expect("an altered file was accepted");
    assert!(matches!(&err, Error::Checksum { path, .. } if path == file), "{err:?}");
    assert!(err.to_string().contains("vision.onnx.data"), "{err}");
}

#[test]
fn altered_data_file_fails_its_checksum() {
    let _guard = shared();
    let dir = engine_copy();
    let data = dir.path().join("vision.onnx.data");
    // A first load verifies every file and remembers it in the cache file.
    load(dir.path(), Verify::Cached).unwrap();
    assert!(dir.path().join(vl_runtime::verify::CACHE_FILE).exists());
    let verified_mtime = std::fs::metadata(&data).unwrap().modified().unwrap();
    let len = std::fs::metadata(&data).unwrap().len();

    // Same size, new mtime: the stale cache entry must not vouch for it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    flip_byte(&data, len / 2);
    assert_eq!(std::fs::metadata(&data).unwrap().len(), len);
    assert_checksum_error(load(dir.path(), Verify::Cached), &data);
    assert_checksum_error(load(dir.path(), Verify::Always), &data);

    // Same size and the old mtime put back: `Verify::Cached` trusts size + mtime (the
    // documented trade-off, so a 14 GB engine is not rehashed on each start); `Always` rehashes.
    flip_byte(&data, len / 3);
    std::fs::File::options().write(true).open(&data).unwrap().set_modified(verified_mtime).unwrap();
    assert_eq!(std::fs::metadata(&data).unwrap().modified().unwrap(), verified_mtime);
    assert!(load(dir.path(), Verify::Cached).is_ok(), "Verify::Cached rehashed a file with its verified stamp");
    assert_checksum_error(load(dir.path(), Verify::Always), &data);
}

#[test]
fn manifest_input_name_differing_from_the_graph_is_a_mismatch() {
    let _guard = shared();
    let dir = engine_copy();
    let mut manifest = Manifest::load(dir.path()).unwrap();
    // The decoder the CPU runs: the in-place twin of the default engine.
    let entry = manifest.graphs.decoder_in_place.as_mut().expect("the default engine has an in-place decoder");
    let file = entry.file.clone();
    assert_eq!(file, "decoder_in_place.onnx");
    let input = &mut entry.inputs[2];
    let real = input.name.clone();
    input.name = format!("{real}_renamed");
    manifest.save(dir.path()).unwrap();
    let err = load(dir.path(), Verify::Cached).err().unwrap();
    let Error::GraphMismatch { path, message } = &err else { panic!("expected GraphMismatch, got {err:?}") };
    assert_eq!(path, &dir.path().join(&file));
    assert!(message.contains(&real) && message.contains(&format!("{real}_renamed")), "{message}");
    let shown = err.to_string();
    assert!(shown.contains(&file) && shown.contains(&real), "{shown}");
}

#[test]
fn manifest_of_another_schema_version_is_a_clear_error() {
    let _guard = shared();
    let dir = engine_copy();
    let path = dir.path().join("manifest.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let line = format!("schema_version: {}", vl_runtime::manifest::SCHEMA_VERSION);
    assert!(yaml.contains(&line), "manifest.yaml has no `{line}`");
    std::fs::write(&path, yaml.replacen(&line, "schema_version: 99", 1)).unwrap();
    let err = load(dir.path(), Verify::Cached).err().unwrap();
    assert!(matches!(&err, Error::Manifest { path: p, .. } if *p == path), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("manifest.yaml") && shown.contains("99") && shown.contains("schema"), "{shown}");
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}

/// Asks the golden question, stopping after `stop_after` tokens.
fn ask_stopping(chat: &mut vl_runtime::Conversation<'_>, stop_after: usize) -> Answer {
    let mut seen = 0;
    let mut on_token = |t: vl_runtime::TokenEvent<'_>| {
        seen += usize::from(t.id.is_some());
        if seen >= stop_after { Flow::Stop } else { Flow::Continue }
    };
    chat.ask(text(&golden()["prompt"]), &greedy(32), &mut on_token).unwrap()
}

#[test]
fn cancelled_generation_leaves_a_usable_conversation() {
    let _guard = shared();
    let p = pipeline();
    let mut chat = p.conversation(video_pixels()).unwrap();
    let cancelled = ask_stopping(&mut chat, 3);
    assert_eq!(cancelled.finish, FinishReason::Cancelled);
    assert_eq!(cancelled.token_ids, ids(&golden()["greedy_tokens"])[..3]);
    let follow_up = ask(&mut chat, "And then?", &greedy(8));

    // The same state reached by a 3-token limit gives the same follow-up.
    let mut reference = p.conversation(video_pixels()).unwrap();
    let limited = ask(&mut reference, text(&golden()["prompt"]), &greedy(3));
    assert_eq!(limited.finish, FinishReason::MaxTokens);
    assert_eq!(limited.token_ids, cancelled.token_ids);
    assert_eq!(ask(&mut reference, "And then?", &greedy(8)).token_ids, follow_up.token_ids);
    assert_eq!(reference.context_len(), chat.context_len());
}

#[test]
fn many_requests_do_not_leak() {
    let _alone = EXCLUSIVE.write().unwrap_or_else(|p| p.into_inner());
    let p = pipeline();
    let mut baseline = 0.0;
    for i in 0..200_usize {
        let mut chat = p.conversation(video_pixels()).unwrap();
        if i.is_multiple_of(2) {
            assert_eq!(ask_stopping(&mut chat, 2).finish, FinishReason::Cancelled);
        } else {
            ask(&mut chat, "What is this?", &greedy(3));
        }
        if i.is_multiple_of(5) {
            ask(&mut chat, "And then?", &greedy(2));
        }
        if i == 19 {
            baseline = rss_mb();
        }
    }
    let grown = rss_mb() - baseline;
    eprintln!("RSS {baseline:.1} MB after request 20, {:.1} MB after 200", baseline + grown);
    // A leaked KV cache (~160 KB a request on this engine) would add ~28 MB over 180 requests.
    assert!(grown < 10.0, "RSS grew by {grown:.1} MB between request 20 and 200");
}

#[test]
fn image_pixels_match_the_golden() {
    let _guard = shared();
    let g = &golden()["image_prompt"];
    let px: Array4<f32> = read_npy(fixture_dir("tiny").join("pixel_values.npy")).unwrap();
    let mut chat = pipeline().conversation(Media::ImagePixels(Arc::new(px))).unwrap();
    let want = ids(&g["greedy_tokens"]);
    assert_eq!(want.len(), 16);
    let answer = ask(&mut chat, text(&g["prompt"]), &greedy(16));
    assert_eq!(answer.token_ids, want);
    assert_eq!(chat.context_len(), ids(&g["input_ids"]).len() + want.len() - 1);
}

#[test]
fn stop_string_ends_the_answer_without_it() {
    let _guard = shared();
    let p = pipeline();
    let golden_tokens = ids(&golden()["greedy_tokens"]);
    let full = ask(&mut p.conversation(video_pixels()).unwrap(), text(&golden()["prompt"]), &greedy(32));
    assert_eq!(full.token_ids, golden_tokens);
    let stop = p.tokenizer().decode(&golden_tokens[3..5], true).unwrap();
    eprintln!("stop string {stop:?} in {:?}", full.text);
    assert!(!stop.is_empty(), "tokens 3..5 decode to nothing");
    let start = full.text.find(&stop).unwrap_or_else(|| panic!("{stop:?} is not in {:?}", full.text));

    let opts = GenerateOptions { stop: vec![stop.clone()], ..greedy(32) };
    let mut streamed = String::new();
    let mut chat = p.conversation(video_pixels()).unwrap();
    let answer = chat
        .ask(text(&golden()["prompt"]), &opts, &mut |t| {
            streamed.push_str(t.text);
            Flow::Continue
        })
        .unwrap();
    assert_eq!(answer.finish, FinishReason::StopString);
    assert_eq!(answer.text, full.text[..start], "stop string {stop:?}");
    assert_eq!(streamed, answer.text);
    assert!(!answer.text.contains(&stop));
    assert!(answer.token_ids.len() < golden_tokens.len());
    assert_eq!(answer.token_ids, golden_tokens[..answer.token_ids.len()]);
}

#[test]
fn altered_graph_file_fails_its_checksum() {
    let _guard = shared();
    let dir = engine_copy();
    let graph = dir.path().join("embed.onnx");
    flip_byte(&graph, std::fs::metadata(&graph).unwrap().len() / 2);
    let err = load(dir.path(), Verify::Cached).err().expect("an altered graph was accepted");
    assert!(matches!(&err, Error::Checksum { path, .. } if *path == graph), "{err:?}");
    assert!(err.to_string().contains("embed.onnx"), "{err}");
}

#[test]
fn absurd_manifest_values_fail_the_load_naming_the_field() {
    let _guard = shared();
    for (field, value) in [("num_layers", "1000000000000"), ("max_sequence_length", "0"), ("head_dim", "0")] {
        let dir = engine_copy();
        let path = dir.path().join("manifest.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let at = yaml.find(&format!("{field}: ")).unwrap_or_else(|| panic!("manifest.yaml has no {field}"));
        let end = at + yaml[at..].find('\n').unwrap();
        std::fs::write(&path, format!("{}{field}: {value}{}", &yaml[..at], &yaml[end..])).unwrap();
        let err = load(dir.path(), Verify::Cached).err().unwrap_or_else(|| panic!("{field}: {value} was accepted"));
        assert!(matches!(&err, Error::Manifest { path: p, .. } if *p == path), "{err:?}");
        assert!(err.to_string().contains(field) && err.to_string().contains(value), "{err}");
    }
}

#[test]
fn tokenizer_without_the_video_token_fails_the_load() {
    let _guard = shared();
    let dir = engine_copy();
    let path = dir.path().join("tokenizer.json");
    let mut tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let added = tokenizer["added_tokens"].as_array_mut().unwrap();
    let before = added.len();
    added.retain(|t| t["content"] != "<video>");
    assert_eq!(added.len(), before - 1, "the fixture's tokenizer has no added <video>");
    if let Some(vocab) = tokenizer["model"]["vocab"].as_object_mut() {
        vocab.remove("<video>");
    }
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let err = load(dir.path(), Verify::Cached).err().expect("a tokenizer without <video> was accepted");
    assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("tokenizer.json") && shown.contains("<video>") && shown.contains("601"), "{shown}");
}

#[test]
fn a_question_holding_a_placeholder_is_refused_and_opens_no_slot() {
    let _guard = shared();
    let p = pipeline();
    let g = golden();
    for question in ["What is <video> here?", "<image>", "<video><video>"] {
        let mut chat = p.conversation(video_pixels()).unwrap();
        let err = chat.ask(question, &greedy(4), &mut |_| Flow::Continue).unwrap_err();
        assert!(matches!(err, Error::Request(_)), "{question:?}: {err:?}");
        assert!(err.to_string().contains("placeholder"), "{question:?}: {err}");
        assert_eq!(chat.context_len(), 0);
        // The conversation is unharmed: the golden question still gets the golden answer.
        assert_eq!(ask(&mut chat, text(&g["prompt"]), &greedy(32)).token_ids, ids(&g["greedy_tokens"]));
        // In a follow-up too.
        let before = chat.context_len();
        let err = chat.ask(question, &greedy(4), &mut |_| Flow::Continue).unwrap_err();
        assert!(matches!(err, Error::Request(_)), "follow-up {question:?}: {err:?}");
        assert_eq!(chat.context_len(), before);
    }
}

#[test]
fn empty_and_control_character_questions_answer() {
    let _guard = shared();
    let p = pipeline();
    // Empty, blank, NUL, escape sequences, bell, carriage returns, a BOM, bidi overrides.
    for question in ["", "   ", "\0", "\x1b[31mred\x1b[0m\x07", "a\r\nb\tc\x7f", "\u{feff}\u{202e}txet"] {
        let mut chat = p.conversation(video_pixels()).unwrap();
        let answer = chat.ask(question, &greedy(4), &mut |_| Flow::Continue).unwrap();
        assert_eq!(answer.token_ids.len(), 4, "{question:?}");
        let prompt = p.tokenizer().encode(question, false).unwrap().get_ids().len();
        // The prompt holds the question's tokens, the template's and the 136 visual tokens.
        assert!(chat.context_len() >= 136 + prompt + 3, "{question:?}: {}", chat.context_len());
        ask(&mut chat, "And then?", &greedy(2));
    }
}
