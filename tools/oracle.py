#!/usr/bin/env python3
"""Python reference ("oracle") for vl-export / vl-runtime.

Subcommands:
  goldens          run a Video-LLaVA checkpoint with transformers (fp32, eager attention) and write
                   golden fixtures (inputs, vision features, logits, greedy tokens, token ids)
  check            run onnx.checker (full_check) on every *.onnx of an engine directory
  compare          run an engine's graphs with onnxruntime on a fixture and report max abs diffs
  synth-reference  write a tiny random Video-LLaVA checkpoint (weights, tokenizer, processor
                   configs) for developing against

Heavy imports (torch, transformers, onnx, onnxruntime) happen inside the functions that need
them. See tools/README.md for the fixture format and the files a checkpoint needs.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from oracle_common import FixtureWriter, clip_pixel_config, sha256_files, top2_margin
from oracle_common import fixture_readme as common_fixture_readme

NUM_FRAMES = 8
IMAGE_NEW_TOKENS = 16
TEXT_NEW_TOKENS = 16
QUESTION = "What is happening in this video?"
QUESTION_2 = "What happens next?"
IMAGE_QUESTION = "What is shown in this image?"
TEXT_ONLY_PROMPT = "USER: hello ASSISTANT:"


# ----------------------------------------------------------------------------- prompts & ids


def video_prompt(question):
    return f"USER: <video>\n{question} ASSISTANT:"


def image_prompt(question):
    return f"USER: <image>\n{question} ASSISTANT:"


def turn_suffix(question):
    """Text appended after a turn's answer ids (llava_v1: `{answer}</s>USER: {next} ASSISTANT:`)."""
    return f"</s>USER: {question} ASSISTANT:"


def visual_token_counts(config, additional=1):
    """(tokens per video frame, tokens per image) exactly as VideoLlavaProcessor counts them.

    Video: (patches + additional) per frame, for every select strategy (the video path never
    drops CLS). Image: one fewer with the "default" strategy, which drops CLS.
    """
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    per_frame = patches + additional
    per_image = per_frame - (1 if config.vision_feature_select_strategy == "default" else 0)
    return per_frame, per_image


def num_additional_image_tokens(ckpt):
    """`num_additional_image_tokens` of processor_config.json (the processor's default is 1)."""
    path = Path(ckpt) / "processor_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    return config.get("num_additional_image_tokens", 1)


# ----------------------------------------------------------------------------- goldens


def load_model(ckpt):
    import torch
    from transformers import GenerationConfig, VideoLlavaForConditionalGeneration

    model, info = VideoLlavaForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    # A tensor transformers could not map would be silently random-initialized.
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"checkpoint does not match the model: {info}")
    if info["unexpected_keys"]:
        print(f"WARNING: unused tensors: {sorted(info['unexpected_keys'])}", file=sys.stderr)
    model.eval()
    # Greedy references are exactly N argmax tokens: nothing from the checkpoint's
    # generation_config.json (penalties...), no stop on EOS and no EOS suppression
    # (min_new_tokens would change the argmax whenever EOS wins).
    model.generation_config = GenerationConfig(
        do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=model.config.text_config.pad_token_id
    )
    return model


def make_pixels(seed, config):
    size = config.vision_config.image_size
    video = np.random.default_rng(seed).standard_normal((1, NUM_FRAMES, 3, size, size)) * 0.5
    image = np.random.default_rng(seed + 1).standard_normal((1, 3, size, size)) * 0.5
    return video.astype(np.float32), image.astype(np.float32)


def greedy(model, ids, n, **pixels):
    """N greedy tokens from generate() plus the raw logits of each step ([N, vocab])."""
    import torch

    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=n,
        return_dict_in_generate=True,
        output_logits=True,
        **{k: torch.from_numpy(v) for k, v in pixels.items()},
    )
    tokens = out.sequences[0, len(ids):].tolist()
    if len(tokens) != n:
        raise RuntimeError(f"generate returned {len(tokens)} tokens, expected {n}")
    logits = torch.cat(out.logits, dim=0).float().numpy()
    return tokens, logits


def forward(model, ids, capture_embeds=False, **pixels):
    """Full-sequence forward: logits [S, vocab] and optionally the spliced inputs_embeds."""
    import torch

    captured = {}

    def hook(_module, _args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"][0].float().numpy().copy()

    handle = None
    if capture_embeds:
        handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = model(
            input_ids=torch.tensor([ids]),
            **{k: torch.from_numpy(v) for k, v in pixels.items()},
        )
    finally:
        if handle is not None:
            handle.remove()
    return out.logits[0].float().numpy(), captured.get("inputs_embeds")


def check_teacher_forced(model, ids, tokens, step_logits, **pixels):
    """Argmax of one forward over prompt + tokens[:-1] must reproduce generate()'s tokens."""
    logits, _ = forward(model, ids + tokens[:-1], **pixels)
    tail = logits[len(ids) - 1 :]
    forced = tail.argmax(-1).tolist()
    return {
        "argmax_equal": forced == tokens,
        "max_abs_diff_vs_cached_decode": float(np.max(np.abs(tail - step_logits))),
    }


def processor_check(ckpt, config, video_ids, image_ids, seed):
    """Load VideoLlavaProcessor from the checkpoint and compare its ids with ours."""
    result = {"loaded": False}
    try:
        from transformers import VideoLlavaProcessor

        processor = VideoLlavaProcessor.from_pretrained(ckpt)
    except Exception as err:  # missing torchvision, missing files...
        result["error"] = f"{type(err).__name__}: {err}"
        return result
    result["loaded"] = True
    size = config.vision_config.image_size
    rng = np.random.default_rng(seed + 2)
    # Non-square raw frames so resize (shortest edge) + center crop are exercised.
    frames = rng.integers(0, 256, (NUM_FRAMES, size + 10, size * 2, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (size * 2, size + 10, 3), dtype=np.uint8)
    video_out = processor(text=video_prompt(QUESTION), videos=[frames], return_tensors="np")
    image_out = processor(text=image_prompt(IMAGE_QUESTION), images=image, return_tensors="np")
    result.update(
        {
            "class": type(processor).__name__,
            "video_processor": type(processor.video_processor).__name__,
            "image_processor": type(processor.image_processor).__name__,
            "tokenizer": type(processor.tokenizer).__name__,
            "num_additional_image_tokens": processor.num_additional_image_tokens,
            "pixel_values_videos_shape": list(video_out["pixel_values_videos"].shape),
            # 5.24's image processor still returns the legacy key `pixel_values_images`.
            "pixel_values_shape": list(image_out.get("pixel_values", image_out.get("pixel_values_images")).shape),
            "video_ids_equal": video_out["input_ids"][0].tolist() == video_ids,
            "image_ids_equal": image_out["input_ids"][0].tolist() == image_ids,
        }
    )
    return result


def tokenizer_json_check(ckpt, texts, ids):
    """Does tokenizer.json alone (the `tokenizers` library, as the Rust side uses it) give the
    same ids as transformers? `texts`: name -> (text, add_special_tokens)."""
    from tokenizers import Tokenizer

    path = Path(ckpt) / "tokenizer.json"
    if not path.exists():
        return {"error": "no tokenizer.json"}
    raw = Tokenizer.from_file(str(path))
    return {k: raw.encode(text, add_special_tokens=special).ids == ids[k] for k, (text, special) in texts.items()}


def model_summary(config, per_frame, per_image):
    text = config.text_config
    return {
        "frames": NUM_FRAMES,
        "image_size": config.vision_config.image_size,
        "patch_size": config.vision_config.patch_size,
        "tokens_per_frame": per_frame,
        "video_tokens": per_frame * NUM_FRAMES,
        "image_tokens": per_image,
        "video_token_index": config.video_token_index,
        "image_token_index": config.image_token_index,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
    }


def greedy_entry(model, tokenizer, fixture, logits_file, ids, n, **pixels):
    """generate() N tokens from `ids`; save the step logits; return the golden.json entry."""
    tokens, step_logits = greedy(model, ids, n, **pixels)
    fixture.save(logits_file, step_logits)
    return {
        "input_ids": ids,
        "greedy_tokens": tokens,
        "greedy_text": tokenizer.decode(tokens),
        "greedy_logits_file": logits_file,
        "greedy_min_top2_margin": top2_margin(step_logits),
    }


def write_goldens(args):
    import torch
    import transformers
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    fixture = FixtureWriter(args.out)
    model, tokenizer = load_model(args.model), AutoTokenizer.from_pretrained(args.model)
    config, n = model.config, args.new_tokens
    per_frame, per_image = visual_token_counts(config, num_additional_image_tokens(args.model))
    texts = {  # name -> (text exactly as tokenized, add_special_tokens)
        "video_prompt": (video_prompt(QUESTION).replace("<video>", "<video>" * (per_frame * NUM_FRAMES)), True),
        "image_prompt": (image_prompt(IMAGE_QUESTION).replace("<image>", "<image>" * per_image), True),
        "second_turn_appended": (turn_suffix(QUESTION_2), False),
        "text_only": (TEXT_ONLY_PROMPT, True),
    }
    ids = {k: tokenizer(text, add_special_tokens=special).input_ids for k, (text, special) in texts.items()}
    video_ids = ids["video_prompt"]
    processor = processor_check(args.model, config, video_ids, ids["image_prompt"], args.seed)
    raw_tokenizer = tokenizer_json_check(args.model, texts, ids)

    video_pixels, image_pixels = make_pixels(args.seed, config)
    fixture.save("pixel_values_videos.npy", video_pixels)
    fixture.save("pixel_values.npy", image_pixels)
    video, image = {"pixel_values_videos": video_pixels}, {"pixel_values": image_pixels}
    with torch.inference_mode():
        feats = model.model.get_video_features(
            torch.from_numpy(video_pixels), vision_feature_layer=config.vision_feature_layer
        ).pooler_output
        fixture.save("video_features.npy", feats.reshape(1, -1, feats.shape[-1]).numpy())
        feats = model.model.get_image_features(
            torch.from_numpy(image_pixels),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        fixture.save("image_features.npy", feats.numpy())

        logits, embeds = forward(model, video_ids, capture_embeds=True, **video)
        fixture.save("logits.npy", logits)
        fixture.save("inputs_embeds.npy", embeds)
        turn1 = greedy_entry(model, tokenizer, fixture, "greedy_logits.npy", video_ids, n, **video)
        tokens = turn1["greedy_tokens"]
        if tokens[0] != int(logits[-1].argmax()):
            raise RuntimeError("first greedy token differs from the argmax of the prefill logits")
        forced = check_teacher_forced(model, video_ids, tokens, np.load(fixture.dir / "greedy_logits.npy"), **video)

        turn2_ids = video_ids + tokens + ids["second_turn_appended"]
        turn2 = greedy_entry(model, tokenizer, fixture, "second_turn_greedy_logits.npy", turn2_ids, n, **video)
        image_entry = greedy_entry(
            model, tokenizer, fixture, "image_greedy_logits.npy", ids["image_prompt"], IMAGE_NEW_TOKENS, **image
        )
        text_logits, _ = forward(model, ids["text_only"])
        fixture.save("text_only_last_logits.npy", text_logits[-1])
        text_entry = greedy_entry(
            model, tokenizer, fixture, "text_only_greedy_logits.npy", ids["text_only"], TEXT_NEW_TOKENS
        )

    golden = {
        "generated_by": "tools/oracle.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "model_sha256": sha256_files(args.model, "*.safetensors"),
        "seed": args.seed,
        "new_tokens": n,
        "model": model_summary(config, per_frame, per_image),
        "prompt": QUESTION,
        "prompt_text": video_prompt(QUESTION),
        **turn1,
        "greedy_teacher_forced_check": forced,
        "processor_check": processor,
        "tokenizer_json_check": raw_tokenizer,
        "second_turn": {
            "prompt": QUESTION_2,
            "appended_text": turn_suffix(QUESTION_2),
            "appended_ids": ids["second_turn_appended"],
            "appended_tokenization": "tokenizer(appended_text, add_special_tokens=False): no BOS; "
            "input_ids = turn-1 input_ids + turn-1 greedy_tokens + appended_ids",
            **turn2,
        },
        "image_prompt": {"prompt": IMAGE_QUESTION, "prompt_text": image_prompt(IMAGE_QUESTION), **image_entry},
        "text_only": {"prompt_text": TEXT_ONLY_PROMPT, "last_logits_file": "text_only_last_logits.npy", **text_entry},
        "files": fixture.files,
    }
    (fixture.dir / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    (fixture.dir / "README.md").write_text(fixture_readme(golden))
    print(f"wrote {fixture.dir} ({len(fixture.files)} arrays, greedy: {tokens[:8]}...)")
    return report_golden_checks(processor, raw_tokenizer, forced)


def report_golden_checks(processor, raw_tokenizer, forced):
    """Warn about checks that cannot be trusted, fail on checks that disagree."""
    problems = []
    if not processor["loaded"]:
        print(f"WARNING: VideoLlavaProcessor did not load: {processor['error']}", file=sys.stderr)
    elif not (processor["video_ids_equal"] and processor["image_ids_equal"]):
        problems.append("VideoLlavaProcessor ids differ from the oracle's ids")
    if not all(v is True for v in raw_tokenizer.values()):
        print(f"WARNING: tokenizer.json alone gives other ids: {raw_tokenizer}", file=sys.stderr)
    if not forced["argmax_equal"]:
        problems.append("teacher-forced argmax differs from generate()")
    for problem in problems:
        print(f"ERROR: {problem}", file=sys.stderr)
    return 1 if problems else 0


def fixture_readme(golden):
    return common_fixture_readme(
        golden,
        "Golden fixture",
        "Produced by the Python reference (transformers, fp32, eager attention, CPU):",
        "Format: see tools/README.md. Do not edit by hand; regenerate.",
    )


# ----------------------------------------------------------------------------- check


def check_engine(args):
    import onnx

    paths = sorted(Path(args.engine).glob("*.onnx"))
    if not paths:
        print(f"no *.onnx in {args.engine}", file=sys.stderr)
        return 1
    failed = 0
    for path in paths:
        try:
            onnx.checker.check_model(str(path), full_check=True)
            print(f"ok    {path.name}")
        except Exception as err:
            failed += 1
            print(f"FAIL  {path.name}: {type(err).__name__}: {err}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- compare


class Graph:
    """An onnxruntime session that feeds only the inputs the graph declares."""

    def __init__(self, path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        unknown = set(self.inputs) - set(feeds)
        if unknown:
            raise KeyError(f"graph needs inputs the oracle does not know: {sorted(unknown)}")
        result = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})
        return dict(zip(self.outputs, result))


def max_diff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def compare_engine(args):
    engine, fixture = Path(args.engine), Path(args.fixture)
    golden = json.loads((fixture / "golden.json").read_text())
    load = lambda name: np.load(fixture / name)  # noqa: E731
    rows = []  # (check, max abs diff or None, note, failed)

    def report(name, diff, note="", failed=False):
        rows.append((name, diff, note, failed or (diff is not None and not diff <= args.tol)))

    def graph(name, required=True):
        if (engine / name).exists():
            return Graph(engine / name)
        report(name, None, "missing" if required else "missing (optional, skipped)", required)
        return None

    def tower(name, required, input_name, output_name):
        """Run a vision graph on the fixture pixels; its output (or the golden one) is returned."""
        reference = load(f"{output_name}.npy")
        g = graph(name, required)
        if g is None:
            return reference
        try:
            out = g.run({input_name: load(f"{input_name}.npy")})[output_name]
            report(f"{name} {output_name}", max_diff(out, reference))
            return out
        except Exception as err:
            report(name, None, f"error: {type(err).__name__}: {err}", True)
            return reference

    video_feats = tower("vision.onnx", True, "pixel_values_videos", "video_features")
    image_feats = tower("image.onnx", False, "pixel_values", "image_features")
    embed, decoder = graph("embed.onnx"), graph("decoder.onnx")
    if embed and decoder:
        lm = LanguageModel(embed, decoder, golden["model"])
        try:
            compare_decoder(golden, load, lm, video_feats, image_feats, report)
        except Exception as err:  # wrong input names, shapes, dtypes: report, keep the table
            report("embed.onnx + decoder.onnx", None, f"error: {type(err).__name__}: {err}", True)

    print(f"{'check':<48} {'max abs diff':>12}  note")
    for name, diff, note, failed in rows:
        shown = "-" if diff is None else f"{diff:.3e}"
        print(f"{name:<48} {shown:>12}  {'FAIL ' if failed else ''}{note}")
    failed = any(row[3] for row in rows)
    print(f"tolerance {args.tol:g}: {'FAIL' if failed else 'ok'}")
    return 1 if failed else 0


class LanguageModel:
    """embed.onnx + decoder.onnx with a growing KV cache (batch 1)."""

    def __init__(self, embed, decoder, model):
        self.embed, self.decoder, self.model = embed, decoder, model
        self.reset()

    def reset(self):
        shape = (1, self.model["num_key_value_heads"], 0, self.model["head_dim"])
        self.past_len = 0
        self.past = {
            f"past_key_values.{i}.{kind}": np.zeros(shape, np.float32)
            for i in range(self.model["num_hidden_layers"])
            for kind in ("key", "value")
        }

    def embeds(self, ids, token_id=None, features=None):
        """embed.onnx on ids, rows equal to `token_id` taking `features` rows in order (the graph splices)."""
        ids = np.array([ids], np.int64)
        index = np.full(ids.shape, -1, np.int64)
        if features is None:
            hidden = self.embed.session.get_outputs()[0].shape[2]
            features = np.zeros((1, 0, hidden), np.float32)
        else:
            mask = ids[0] == token_id
            if int(mask.sum()) != features.shape[1]:
                raise ValueError(f"{int(mask.sum())} placeholder tokens but {features.shape[1]} features")
            index[0, mask] = np.arange(int(mask.sum()))
        feeds = {"input_ids": ids, "visual_features": features.astype(np.float32), "visual_index": index}
        return self.embed.run(feeds)["inputs_embeds"]

    def step(self, embeds, keep=1, commit=True):
        """Run the decoder on top of the cache; returns logits [keep, vocab]."""
        seq = embeds.shape[1]
        feeds = {
            "inputs_embeds": embeds.astype(np.float32),
            "attention_mask": np.ones((1, self.past_len + seq), np.int64),
            "position_ids": np.arange(self.past_len, self.past_len + seq, dtype=np.int64)[None],
            "logits_to_keep": np.array([keep], np.int64),
            **self.past,
        }
        out = self.decoder.run(feeds)
        if commit:
            self.past_len += seq
            self.past = {
                k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k.startswith("present.")
            }
        return out["logits"][0]

    def teacher_forced(self, first_logits, tokens, step_logits):
        """Feed golden greedy tokens one by one: (worst diff vs step_logits, argmax agreement)."""
        logits, worst, agree = first_logits, 0.0, 0
        for i, token in enumerate(tokens):
            worst = max(worst, max_diff(logits, step_logits[i]))
            agree += int(np.argmax(logits)) == token
            if i + 1 < len(tokens):
                logits = self.step(self.embeds([token]))[-1]
        return worst, agree


def compare_decoder(golden, load, lm, video_feats, image_feats, report):
    model = golden["model"]

    def greedy_row(name, first_logits, entry):
        """Teacher-force an entry's greedy tokens after a prefill whose last logits are given."""
        tokens = entry["greedy_tokens"]
        worst, agree = lm.teacher_forced(first_logits, tokens, load(entry["greedy_logits_file"]))
        report(name, worst, f"argmax agrees {agree}/{len(tokens)}", agree != len(tokens))

    ids, golden_logits = golden["input_ids"], load("logits.npy")
    golden_embeds = load("inputs_embeds.npy")[None]
    text_rows = np.array(ids) != model["video_token_index"]
    embeds = lm.embeds(ids)
    report("embed.onnx (text rows)", max_diff(embeds[:, text_rows], golden_embeds[:, text_rows]))
    embeds = lm.embeds(ids, model["video_token_index"], video_feats)
    report("spliced inputs_embeds", max_diff(embeds, golden_embeds))

    last = lm.step(embeds, keep=1, commit=False)
    report("video prefill, logits_to_keep=1", max_diff(last[-1], golden_logits[-1]))
    logits = lm.step(embeds, keep=len(ids))
    report(f"video prefill, all {len(ids)} rows", max_diff(logits, golden_logits))
    greedy_row(f"video decode, {len(golden['greedy_tokens'])} steps", logits[-1], golden)

    # Turn 2 continues on the same cache: the last answer token and the appended text in one chunk.
    turn2 = golden["second_turn"]
    chunk, past = [golden["greedy_tokens"][-1]] + turn2["appended_ids"], lm.past_len
    logits = lm.step(lm.embeds(chunk))
    greedy_row(f"turn 2: chunk of {len(chunk)} on past {past}, decode", logits[-1], turn2)

    image = golden["image_prompt"]
    lm.reset()
    logits = lm.step(lm.embeds(image["input_ids"], model["image_token_index"], image_feats))
    greedy_row("image prompt prefill + decode", logits[-1], image)

    text = golden["text_only"]
    lm.reset()
    logits = lm.step(lm.embeds(text["input_ids"]))
    report("text-only last logits", max_diff(logits[-1], load(text["last_logits_file"])))
    greedy_row("text-only prefill + decode", logits[-1], text)


# ----------------------------------------------------------------------------- synth-reference


PRESETS = {
    "tiny": {
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 56,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
        "text": {
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "max_position_embeddings": 512,
        },
    }
}

# Words whose BPE merges the synthetic tokenizer learns (each word: left-to-right merges).
MERGE_WORDS = [
    "USER", "ASSISTANT", "What", "Ġwhat", "Ġis", "Ġhappening", "Ġhappens", "Ġin", "Ġthis",
    "Ġvideo", "Ġimage", "Ġshown", "Ġnext", "Ġhello", "Ġthe", "Ġand", "Ġof", "Ġto", "Ġa",
]
SPECIAL_HEAD = ["<unk>", "<s>", "</s>"]
SPECIAL_TAIL = ["<image>", "<video>", "<pad>"]


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, in byte order 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def synth_vocab():
    """Byte-level BPE vocab: specials 0..2, the 256 byte symbols, then MERGE_WORDS merges."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_HEAD)}
    for b, ch in sorted(bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    merges = []
    for word in MERGE_WORDS:
        current = word[0]
        for ch in word[1:]:
            merged = current + ch
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((current, ch))
            current = merged
    return vocab, merges


def synth_tokenizer(out_dir):
    """Write tokenizer.json; return {special token: id}."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = synth_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_HEAD + SPECIAL_TAIL])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIAL_HEAD + SPECIAL_TAIL}, tok.get_vocab_size()


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def synth_processor_files(out_dir, image_size, patch_size, max_length):
    """The tokenizer/processor configs VideoLlavaProcessor.from_pretrained needs."""
    write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "model_max_length": max_length,
            "extra_special_tokens": {"image_token": "<image>", "video_token": "<video>"},
        },
    )
    pixels = clip_pixel_config(image_size)
    write_json(
        out_dir / "preprocessor_config.json",
        {"image_processor_type": "VideoLlavaImageProcessor", "processor_class": "VideoLlavaProcessor", **pixels},
    )
    write_json(
        out_dir / "video_preprocessor_config.json",
        {"video_processor_type": "VideoLlavaVideoProcessor", "processor_class": "VideoLlavaProcessor", **pixels},
    )
    write_json(
        out_dir / "processor_config.json",
        {
            "processor_class": "VideoLlavaProcessor",
            "patch_size": patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": "<image>",
            "video_token": "<video>",
        },
    )


def synth_reference(args):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    preset = PRESETS[args.preset]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids, tokenizer_size = synth_tokenizer(out_dir)
    vocab_size = -(-tokenizer_size // 64) * 64  # padded like the HF port's 32064
    vision = preset["vision"]
    per_frame = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
            **preset["text"],
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=per_frame - 1,
        video_seq_length=per_frame * NUM_FRAMES,
        pad_token_id=ids["<pad>"],
    )
    torch.manual_seed(args.seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    synth_processor_files(
        out_dir, vision["image_size"], vision["patch_size"], preset["text"]["max_position_embeddings"]
    )
    print(f"wrote {out_dir}: tokenizer {tokenizer_size} tokens {ids}, vocab_size {vocab_size}")
    return 0


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("goldens", help="write golden fixtures from a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="fixture directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=32)
    p.set_defaults(func=write_goldens)

    p = sub.add_parser("check", help="onnx.checker full_check on every *.onnx")
    p.add_argument("--engine", required=True)
    p.set_defaults(func=check_engine)

    p = sub.add_parser("compare", help="run the engine with onnxruntime against a fixture")
    p.add_argument("--engine", required=True)
    p.add_argument("--fixture", required=True)
    p.add_argument("--tol", type=float, default=1e-4)
    p.set_defaults(func=compare_engine)

    p = sub.add_parser("synth-reference", help="write a tiny random checkpoint (development only)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=synth_reference)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
