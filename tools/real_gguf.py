"""The numpy-only half of tools/assemble_real.py: a Video-LLaVA checkpoint from a LLaMA GGUF.

Needs numpy and gguf-py only (both in .venv after `make setup`), so CI can build the real-weight
checkpoint without torch or transformers. Everything here mirrors what transformers 5 does when
it loads the GGUF (`modeling_gguf_pytorch_utils.load_gguf_checkpoint` for the tensors,
`integrations/gguf/gguf_tokenizer_mapping.py` for the tokenizer); `assemble_real.py --check`
compares the two with the oracle venv.

The vision tower and projector are random, drawn from `numpy.random.default_rng(seed)`, and the
projector's output is rescaled to the spread of the trained embeddings with a numpy CLIP forward.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from oracle_common import clip_pixel_config

NUM_FRAMES = 8
# The `tiny` preset of `vl-export synth` (exporter/src/synth/mod.rs).
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": 14,
}
LAYER_NORM_EPS = 1e-5
PLACEHOLDERS = ["<image>", "<video>"]
# GGUF tensor names -> transformers' llama names (DENSE_DECODER_RENAMINGS and the llama norms).
GGUF_RENAMES = [
    ("token_embd.", "model.embed_tokens."),
    ("output_norm.", "model.norm."),
    ("output.", "lm_head."),
]
GGUF_LAYER_RENAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
CONTROL = 3  # llama.cpp's token type of a control token
USER_DEFINED = 4


class AssembleError(Exception):
    """What stops the assembly, said to the user."""


# --- reading the GGUF ------------------------------------------------------------------------


def hf_name(gguf_name: str) -> str:
    """The transformers name of a GGUF tensor of a llama model."""
    for prefix, to in GGUF_RENAMES:
        if gguf_name.startswith(prefix):
            return to + gguf_name[len(prefix) :]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_LAYER_RENAMES:
        return f"model.layers.{parts[1]}.{GGUF_LAYER_RENAMES[parts[2]]}.{parts[3]}"
    raise AssembleError(f"GGUF tensor {gguf_name} has no llama counterpart")


def reverse_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's rotary permutation of q/k rows (transformers' `_reverse_permute_weights`)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: Path):
    """`(tensors, llama metadata, tokenizer metadata)` of a llama GGUF, tensors in fp32 with
    transformers' names and layouts."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise AssembleError(f"{path}: architecture {arch!r}; only llama GGUFs are supported")
    meta = {k.removeprefix("llama."): field(reader, k) for k in reader.fields if k.startswith("llama.")}
    heads, kv_heads = meta["attention.head_count"], meta.get("attention.head_count_kv", meta["attention.head_count"])
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if ".attn_q." in t.name:
            w = reverse_permute(w, heads)
        elif ".attn_k." in t.name:
            w = reverse_permute(w, kv_heads)
        tensors[hf_name(t.name)] = np.ascontiguousarray(w)
    tok = {
        "model": field(reader, "tokenizer.ggml.model"),
        "pre": field(reader, "tokenizer.ggml.pre"),
        "tokens": field(reader, "tokenizer.ggml.tokens"),
        "token_type": field(reader, "tokenizer.ggml.token_type"),
        "merges": field(reader, "tokenizer.ggml.merges"),
        **{k: field(reader, f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id", "unknown_token_id")},
        "padding_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
    }
    return tensors, meta, tok


# --- the tokenizer ---------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def added_token(i: int, content: str, special: bool) -> dict:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def byte_level_tokenizer(tok: dict) -> tuple[dict, dict]:
    """`(tokenizer.json, special ids)` for a `gpt2` GGUF vocabulary, as transformers' GGUF converter
    builds it (`byte_level_tokenizer` + `add_gguf_special_tokens`), plus the placeholders and a pad."""
    if tok["model"] != "gpt2":
        raise AssembleError(f"tokenizer {tok['model']!r}: only byte-level BPE (gpt2) GGUF vocabularies are supported")
    if tok["pre"] not in (None, "default", "gpt2", "smollm"):
        raise AssembleError(f"pre-tokenizer {tok['pre']!r} splits differently from GPT-2's; not supported")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = tok["tokens"]
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    types = tok["token_type"] or []
    added = [added_token(i, t, True) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and set(t) <= alphabet]
    added += [added_token(i, t, False) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == USER_DEFINED]
    pad = tok["padding_token_id"]
    new = PLACEHOLDERS + (["<pad>"] if pad is None or pad == tok["eos_token_id"] else [])
    ids = {t: len(tokens) + k for k, t in enumerate(new)}
    added += [added_token(i, t, True) for t, i in ids.items()]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": sorted(added, key=lambda a: a["id"]),
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        },
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ") for m in tok["merges"]],
        },
    }
    special = {
        "bos_token": tokens[tok["bos_token_id"]],
        "eos_token": tokens[tok["eos_token_id"]],
        "unk_token": tokens[tok["unknown_token_id"]] if tok["unknown_token_id"] is not None else None,
        "pad_token": "<pad>" if "<pad>" in ids else tokens[pad],
    }
    ids["pad"] = ids.get("<pad>", pad)
    ids["bos"] = tok["bos_token_id"]
    ids["eos"] = tok["eos_token_id"]
    return tokenizer, {"special": {k: v for k, v in special.items() if v is not None}, "ids": ids}


# --- the config ------------------------------------------------------------------------------


def text_config(meta: dict, vocab_size: int, ids: dict, tied: bool) -> dict:
    """transformers' LlamaConfig (as `to_dict` writes it) for the GGUF's llama metadata."""
    heads = meta["attention.head_count"]
    hidden = meta["embedding_length"]
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "head_dim": meta.get("attention.key_length") or hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": meta["feed_forward_length"],
        "max_position_embeddings": meta["context_length"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": meta["block_count"],
        "num_key_value_heads": meta.get("attention.head_count_kv") or heads,
        "pad_token_id": ids["pad"],
        "pretraining_tp": 1,
        "rms_norm_eps": float(meta["attention.layer_norm_rms_epsilon"]),
        "rope_parameters": {"rope_theta": float(meta.get("rope.freq_base", 10000.0)), "rope_type": "default"},
        "tie_word_embeddings": tied,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def vision_config() -> dict:
    return {
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        **{k: TINY_VISION[k] for k in ("hidden_size", "image_size")},
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": TINY_VISION["intermediate_size"],
        "layer_norm_eps": LAYER_NORM_EPS,
        "model_type": "clip_vision_model",
        "num_attention_heads": TINY_VISION["num_attention_heads"],
        "num_channels": 3,
        "num_hidden_layers": TINY_VISION["num_hidden_layers"],
        "patch_size": TINY_VISION["patch_size"],
        "projection_dim": TINY_VISION["hidden_size"],
    }


def tokens_per_frame() -> int:
    return (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2 + 1


def model_config(text: dict, ids: dict) -> dict:
    """VideoLlavaConfig as `save_pretrained` writes it, less `transformers_version`."""
    per_frame = tokens_per_frame()
    return {
        "architectures": ["VideoLlavaForConditionalGeneration"],
        "dtype": "float32",
        "image_seq_length": per_frame - 1,
        "image_token_index": ids["<image>"],
        "model_type": "video_llava",
        "multimodal_projector_bias": True,
        "pad_token_id": ids["pad"],
        "projector_hidden_act": "gelu",
        "text_config": text,
        "tie_word_embeddings": text["tie_word_embeddings"],
        "video_seq_length": per_frame * NUM_FRAMES,
        "video_token_index": ids["<video>"],
        "vision_config": vision_config(),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }


# --- the random vision tower -----------------------------------------------------------------


def tower_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """CLIP vision tensors in `named_parameters` order."""
    h, m, p = TINY_VISION["hidden_size"], TINY_VISION["intermediate_size"], TINY_VISION["patch_size"]
    shapes = [
        ("embeddings.class_embedding", (h,)),
        ("embeddings.patch_embedding.weight", (h, 3, p, p)),
        ("embeddings.position_embedding.weight", (tokens_per_frame(), h)),
        ("pre_layrnorm.weight", (h,)),
        ("pre_layrnorm.bias", (h,)),
    ]
    for i in range(TINY_VISION["num_hidden_layers"]):
        pre = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes += [(f"{pre}self_attn.{proj}.weight", (h, h)), (f"{pre}self_attn.{proj}.bias", (h,))]
        shapes += [(f"{pre}layer_norm1.weight", (h,)), (f"{pre}layer_norm1.bias", (h,))]
        shapes += [(f"{pre}mlp.fc1.weight", (m, h)), (f"{pre}mlp.fc1.bias", (m,))]
        shapes += [(f"{pre}mlp.fc2.weight", (h, m)), (f"{pre}mlp.fc2.bias", (h,))]
        shapes += [(f"{pre}layer_norm2.weight", (h,)), (f"{pre}layer_norm2.bias", (h,))]
    return shapes + [("post_layernorm.weight", (h,)), ("post_layernorm.bias", (h,))]


def init_tower(rng) -> dict[str, np.ndarray]:
    """Random CLIP weights scaled as `vl-export synth` scales them (exporter/src/synth/weights.rs):
    activations stay near unit size through the layers instead of collapsing to a constant."""
    out = {}
    for name, shape in tower_shapes():
        z = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("class_embedding"):
            v = z
        elif name.endswith("patch_embedding.weight"):
            v = z * np.float32((3 * shape[-1] * shape[-2]) ** -0.5)
        elif name.endswith("position_embedding.weight"):
            v = z * np.float32(0.5)
        elif "norm" in name and name.endswith("weight"):
            v = np.float32(1.0) + np.float32(0.1) * z
        elif name.endswith("bias"):
            v = np.float32(0.1) * z
        elif name.endswith("weight") and len(shape) == 2:
            v = z * np.float32(shape[1] ** -0.5)
        else:
            raise AssembleError(f"no init rule for vision tensor {name}")
        out[name] = v.astype(np.float32)
    return out


def seeded_pixels(seed: int) -> np.ndarray:
    """`default_rng(seed).standard_normal(...) * 0.5`, as tools/oracle.py's fixtures."""
    side = TINY_VISION["image_size"]
    return np.random.default_rng(seed).standard_normal((1, NUM_FRAMES, 3, side, side)).astype(np.float32) * 0.5


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LAYER_NORM_EPS) * w + b


def clip_hidden_states(t: dict, pixels: np.ndarray) -> list[np.ndarray]:
    """transformers' `CLIPVisionModel(...).hidden_states` in float64, for frames `(n, 3, s, s)`."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    n, c, s, _ = pixels.shape
    p = TINY_VISION["patch_size"]
    g = s // p
    patches = pixels.astype(np.float64).reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    x = patches @ t["embeddings.patch_embedding.weight"].reshape(TINY_VISION["hidden_size"], -1).T
    cls = np.broadcast_to(t["embeddings.class_embedding"], (n, 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1) + t["embeddings.position_embedding.weight"]
    x = layer_norm(x, t["pre_layrnorm.weight"], t["pre_layrnorm.bias"])
    states = [x]
    heads = TINY_VISION["num_attention_heads"]
    for i in range(TINY_VISION["num_hidden_layers"]):
        pre = f"encoder.layers.{i}."

        def lin(name, v, pre=pre):
            return v @ t[f"{pre}{name}.weight"].T + t[f"{pre}{name}.bias"]

        h = layer_norm(x, t[f"{pre}layer_norm1.weight"], t[f"{pre}layer_norm1.bias"])
        q, k, v = (lin(f"self_attn.{a}_proj", h).reshape(n, -1, heads, x.shape[-1] // heads).transpose(0, 2, 1, 3) for a in "qkv")
        a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        a = np.exp(a - a.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)) @ v
        x = x + lin("self_attn.out_proj", a.transpose(0, 2, 1, 3).reshape(x.shape))
        h = lin("mlp.fc1", layer_norm(x, t[f"{pre}layer_norm2.weight"], t[f"{pre}layer_norm2.bias"]))
        x = x + lin("mlp.fc2", h / (1.0 + np.exp(-1.702 * h)))
        states.append(x)
    return states


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def projected_video_features(tower: dict, projector: dict, pixels: np.ndarray) -> np.ndarray:
    """`get_video_features(...).pooler_output` (feature layer -2), float64, one row per token."""
    b, f = pixels.shape[:2]
    x = clip_hidden_states(tower, pixels.reshape(b * f, *pixels.shape[2:]))[-2]
    p = {k: v.astype(np.float64) for k, v in projector.items()}
    x = gelu(x @ p["linear_1.weight"].T + p["linear_1.bias"]) @ p["linear_2.weight"].T + p["linear_2.bias"]
    return x.reshape(-1, x.shape[-1])


def vision_tensors(seed: int, width: int, embedding_std: float) -> tuple[dict[str, np.ndarray], float]:
    """The towers (the image tower a copy of the video tower, as in the HF port, where the two share
    all but three tensors) and a projector whose output has the trained embeddings' spread."""
    rng = np.random.default_rng(seed)
    tower = init_tower(rng)
    h = TINY_VISION["hidden_size"]
    projector = {}
    for name, fan_in in (("linear_1", h), ("linear_2", width)):
        projector[f"{name}.weight"] = (rng.standard_normal((width, fan_in), dtype=np.float32) * np.float32(fan_in**-0.5))
        projector[f"{name}.bias"] = rng.standard_normal((width,), dtype=np.float32) * np.float32(0.1)
    feats = projected_video_features(tower, projector, seeded_pixels(seed))
    scale = embedding_std / float(feats.std(ddof=1))
    for k in ("linear_2.weight", "linear_2.bias"):
        projector[k] = (projector[k] * np.float32(scale)).astype(np.float32)
    out = {f"{t}.{k}": v for t in ("video_tower", "image_tower") for k, v in tower.items()}
    out.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
    return out, scale


# --- the checkpoint --------------------------------------------------------------------------


def grow_rows(w: np.ndarray, rows: int) -> np.ndarray:
    """`w` with rows appended up to `rows`, each the mean of the trained rows (float64 mean)."""
    extra = rows - w.shape[0]
    mean = w.astype(np.float64).mean(0).astype(np.float32)
    return np.concatenate([w, np.broadcast_to(mean, (extra, w.shape[1]))]).astype(np.float32)


def language_tensors(llm: dict[str, np.ndarray], vocab: int) -> tuple[dict[str, np.ndarray], bool]:
    """The LLM's tensors under the port's names, embeddings (and an untied head) grown to `vocab`."""
    tied = "lm_head.weight" not in llm
    out = {}
    for k, v in llm.items():
        if k.startswith("model."):
            out["language_model." + k] = v
    out["language_model.model.embed_tokens.weight"] = grow_rows(llm["model.embed_tokens.weight"], vocab)
    if not tied:
        out["language_model.lm_head.weight"] = grow_rows(llm["lm_head.weight"], vocab)
    return out, tied


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in sorted(tensors):
        n = tensors[k].nbytes
        header[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[k], dtype="<f4").tobytes())


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def side_files(special: dict, max_positions: int) -> dict[str, dict]:
    """tokenizer_config, special tokens and processor configs, by file name."""
    side = TINY_VISION["image_size"]
    pixels = {"processor_class": "VideoLlavaProcessor", **clip_pixel_config(side)}
    return {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": max_positions,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "extra_special_tokens": {"image_token": "<image>", "video_token": "<video>"},
        },
        "special_tokens_map.json": special,
        "preprocessor_config.json": {"image_processor_type": "VideoLlavaImageProcessor", **pixels},
        "video_preprocessor_config.json": {"video_processor_type": "VideoLlavaVideoProcessor", **pixels},
        "processor_config.json": {
            "processor_class": "VideoLlavaProcessor",
            "patch_size": TINY_VISION["patch_size"],
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": "<image>",
            "video_token": "<video>",
        },
    }


def assemble(llm: dict, meta: dict, tok: dict, seed: int, pad_to: int) -> dict:
    """Every file of the checkpoint (name -> JSON value, `model.safetensors` -> tensors) and a summary."""
    tokenizer, special = byte_level_tokenizer(tok)
    ids = special["ids"]
    trained = llm["model.embed_tokens.weight"]
    rows = max(max(ids[t] for t in PLACEHOLDERS + ["pad"]) + 1, trained.shape[0])
    vocab = -(-rows // pad_to) * pad_to
    tensors, tied = language_tensors(llm, vocab)
    embedding_std = float(trained.astype(np.float64).std(ddof=1))
    vision, scale = vision_tensors(seed, trained.shape[1], embedding_std)
    tensors.update(vision)
    text = text_config(meta, vocab, ids, tied)
    config = model_config(text, ids)
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    files = {
        "model.safetensors": tensors,
        "config.json": config,
        "generation_config.json": {"_from_model_config": True, **generation, "use_cache": True},
        "tokenizer.json": tokenizer,
        **side_files(special["special"], text["max_position_embeddings"]),
    }
    info = {
        "special_ids": ids,
        "vocab_size": vocab,
        "tokenizer_size": len(tok["tokens"]) + len([k for k in ids if k.startswith("<")]),
        "embedding_std": embedding_std,
        "projector_scale": scale,
        "tokens_per_frame": tokens_per_frame(),
    }
    return {"files": files, "info": info}


def write_checkpoint(out: Path, files: dict, summary: dict) -> None:
    """Writes into `out.partial/`, then renames: a checkpoint directory is complete or absent.
    Refuses to replace a symlink (it would write into someone else's directory)."""
    import shutil

    if out.is_symlink():
        raise AssembleError(f"{out} is a symlink; remove it or choose another --out")
    tmp = out.with_name(out.name + ".partial")
    if tmp.is_symlink():
        raise AssembleError(f"{tmp} is a symlink")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, value in files.items():
        if name.endswith(".safetensors"):
            write_safetensors(tmp / name, value)
        elif name == "tokenizer.json":
            (tmp / name).write_text(json.dumps(value, ensure_ascii=False))
        else:
            write_json(tmp / name, value)
    write_json(tmp / "assembly.json", summary)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
