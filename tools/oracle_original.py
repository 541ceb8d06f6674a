#!/usr/bin/env python3
"""Python reference for the original Video-LLaVA checkpoint layout (`LlavaLlamaForCausalLM`).

The original model is not in transformers: its video tower is LanguageBind's CLIP vision
transformer with divided space-time attention. This script re-states the pieces of the original
code (PKU-YuanGroup/Video-LLaVA `videollava/`, LanguageBind `modeling_video.py`) that inference
uses, on top of transformers' CLIP modules (`CLIPVisionEmbeddings`, `CLIPAttention`, `CLIPMLP`)
and `LlamaForCausalLM`, in fp32 with eager attention on the CPU:

- the video tower layer: regroup [B*T, N, D] -> [B*N, T, D], add the layer's temporal_embedding,
  keep that as the residual, temporal_layer_norm1, temporal_attn across frames, add, regroup
  back; then the usual CLIP layer. hidden_states are recorded before each layer and after the
  last (hidden_states[-2] = output of the second-to-last layer), reshaped to [B, T, N, D];
- features: video = hidden_states[select_layer], all tokens, per frame; image =
  hidden_states[select_layer][:, 1:] (`patch`); then `mm_projector` (Linear, GELU, Linear);
- the prompt: llava_v1 `get_prompt`, `tokenizer_image_token` (split on `<image>`, tokenize each
  chunk, keep the first chunk's BOS only, IMAGE_TOKEN_INDEX = -200 per marker), and the
  embeddings spliced as `prepare_inputs_labels_for_multimodal` does (each marker -> one frame's
  features);
- preprocessing: LanguageBind's video transform (x / 255, NormalizeVideo, ShortSideScale with
  bilinear `interpolate`, CenterCropVideo; the random flip is left out) and, for images,
  `expand2square` with the mean color + LanguageBind's image transform.

Subcommand:
  goldens  --model CKPT --out FIXTURE [--video-tower DIR] [--image-tower DIR] [--seed 0] [--new-tokens 32]

The fixture has the format of tools/oracle.py's (see tools/README.md), so `oracle.py compare`
checks an engine against it; `input_ids` there are the ids with each marker expanded to one
placeholder id per visual token (the placeholder is `<unk>`, as vl-export chooses), and
`input_ids_with_markers` the original ids with -200.
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np

from oracle_common import FixtureWriter, sha256_files, top2_margin
from oracle_common import fixture_readme as common_fixture_readme

IMAGE_TOKEN_INDEX = -200
IMAGE_MARKER = "<image>"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
QUESTION = "What is happening in this video?"
QUESTION_2 = "What happens next?"
IMAGE_QUESTION = "What is shown in this image?"
TEXT_QUESTION = "hello"
IMAGE_NEW_TOKENS = 16
TEXT_NEW_TOKENS = 16
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- prompt


def llava_v1_prompt(messages):
    """conv_llava_v1.get_prompt() (SeparatorStyle.TWO, sep " ", sep2 "</s>")."""
    seps = [" ", "</s>"]
    ret = SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return ret


def first_turn(markers, question):
    """The first user message: markers joined by single spaces, a newline, the question."""
    body = f"{' '.join([IMAGE_MARKER] * markers)}\n{question}" if markers else question
    return llava_v1_prompt([("USER", body), ("ASSISTANT", None)])


def tokenizer_image_token(prompt, tokenizer):
    """videollava/mm_utils.py tokenizer_image_token, verbatim in behaviour."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_MARKER)]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand_markers(ids, per_marker, placeholder):
    """Each IMAGE_TOKEN_INDEX becomes `per_marker` placeholder ids (the engine's layout)."""
    out = []
    for i in ids:
        out.extend([placeholder] * per_marker if i == IMAGE_TOKEN_INDEX else [i])
    return out


# ----------------------------------------------------------------------------- model


def tower_config_file(ckpt, named, explicit):
    """The tower's config.json: --*-tower DIR, else mm_*_tower as a path or its last component."""
    if explicit:
        path = Path(explicit)
        return path if path.is_file() else path / "config.json"
    for candidate in [Path(ckpt) / named, Path(ckpt) / Path(named).name]:
        if (candidate / "config.json").is_file():
            return candidate / "config.json"
    raise SystemExit(f"no tower config for {named}: pass --video-tower / --image-tower")


def clip_config(config_file):
    from transformers import CLIPVisionConfig

    raw = json.loads(Path(config_file).read_text())
    vision = raw.get("vision_config", raw)
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "hidden_act", "layer_norm_eps", "num_channels"]
    config = CLIPVisionConfig(**{k: vision[k] for k in keys if k in vision})
    config._attn_implementation = "eager"
    frames = vision.get("num_frames", 8) if vision.get("add_time_attn", False) else None
    return config, frames


def build_modules(frames_default=8):
    """The module classes (imported lazily: torch is heavy)."""
    import torch
    from torch import nn
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPMLP, CLIPVisionEmbeddings

    class LanguageBindLayer(nn.Module):
        """LanguageBind's CLIPEncoderLayer (modeling_video.py) with `add_time_attn`."""

        def __init__(self, config, frames):
            super().__init__()
            d = config.hidden_size
            self.self_attn = CLIPAttention(config)
            self.layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
            self.mlp = CLIPMLP(config)
            self.layer_norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
            self.t = frames
            if frames is not None:
                self.temporal_embedding = nn.Parameter(torch.zeros(1, frames, d))
                self.temporal_attn = CLIPAttention(config)
                self.temporal_layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)

        def forward(self, hidden_states):
            if self.t is not None:
                bt, n, d = hidden_states.shape
                t = self.t
                b = bt // t

                def by_token(x):  # '(b t) n d -> (b n) t d'
                    return x.reshape(b, t, n, d).permute(0, 2, 1, 3).reshape(b * n, t, d)

                def by_frame(x):  # '(b n) t d -> (b t) n d'
                    return x.reshape(b, n, t, d).permute(0, 2, 1, 3).reshape(b * t, n, d)

                if t != 1:
                    hidden_states = by_frame(by_token(hidden_states) + self.temporal_embedding[:, :t, :])
                residual = hidden_states
                h = self.temporal_layer_norm1(by_token(hidden_states))
                h, _ = self.temporal_attn(hidden_states=h)
                hidden_states = residual + by_frame(h)
            residual = hidden_states
            h, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states))
            hidden_states = residual + h
            residual = hidden_states
            return residual + self.mlp(self.layer_norm2(hidden_states))

    class Encoder(nn.Module):
        def __init__(self, config, frames):
            super().__init__()
            self.layers = nn.ModuleList([LanguageBindLayer(config, frames) for _ in range(config.num_hidden_layers)])

    class LanguageBindTower(nn.Module):
        """LanguageBind's CLIPVisionTransformer: returns all hidden states ([B, T, N, D] for video)."""

        def __init__(self, config, frames):
            super().__init__()
            d = config.hidden_size
            self.embeddings = CLIPVisionEmbeddings(config)
            self.pre_layrnorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
            self.encoder = Encoder(config, frames)
            self.post_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

        def forward(self, pixel_values):
            video = pixel_values.ndim == 5
            if video:
                b, c, t, h, w = pixel_values.shape  # 'b c t h w -> (b t) c h w'
                pixel_values = pixel_values.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
            h = self.pre_layrnorm(self.embeddings(pixel_values))
            states = []
            for layer in self.encoder.layers:
                states.append(h)
                h = layer(h)
            states.append(h)
            if video:
                states = [s.reshape(b, t, *s.shape[1:]) for s in states]
            return states

    return LanguageBindTower


class OriginalVideoLlava:
    """Towers, projector and LLaMA of an original-layout checkpoint, loaded from safetensors."""

    def __init__(self, ckpt, video_tower=None, image_tower=None):
        import torch
        from safetensors.torch import load_file
        from torch import nn
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

        self.dir = Path(ckpt)
        self.config = json.loads((self.dir / "config.json").read_text())
        c = self.config
        if c.get("mm_projector_type") != "mlp2x_gelu":
            raise SystemExit(f"mm_projector_type {c.get('mm_projector_type')!r} is not handled here")
        weights = {}
        for f in sorted(self.dir.glob("*.safetensors")):
            weights.update(load_file(str(f)))

        def sub(prefix):
            return {k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)}

        tower_class = build_modules()
        self.towers, self.frames = {}, None
        for name, explicit in [("video", video_tower), ("image", image_tower)]:
            config, frames = clip_config(tower_config_file(ckpt, c[f"mm_{name}_tower"], explicit))
            if name == "image":
                frames = None  # an image is a single frame
            else:
                self.frames = frames or 8
            tower = tower_class(config, frames).eval()
            missing, unexpected = tower.load_state_dict(sub(f"model.{name}_tower.{name}_tower."), strict=False)
            if missing or (unexpected and name == "video"):
                raise RuntimeError(f"{name} tower: missing {missing}, unexpected {unexpected}")
            self.towers[name] = tower
            if name == "video":
                self.tokens_per_frame = (config.image_size // config.patch_size) ** 2 + 1
                self.image_size = config.image_size
        hidden = c["hidden_size"]
        self.projector = nn.Sequential(nn.Linear(c["mm_hidden_size"], hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.projector.load_state_dict(sub("model.mm_projector."))
        self.projector.eval()
        self.select_layer = c.get("mm_vision_select_layer", -2)
        self.select_feature = c.get("mm_vision_select_feature", "patch")

        llama = LlamaConfig(
            vocab_size=c["vocab_size"], hidden_size=hidden, intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), max_position_embeddings=c.get("max_position_embeddings", 4096),
            rope_parameters={"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)},
            tie_word_embeddings=c.get("tie_word_embeddings", False), bos_token_id=c.get("bos_token_id", 1),
            eos_token_id=c.get("eos_token_id", 2), pad_token_id=c.get("pad_token_id"), hidden_act="silu",
        )
        llama._attn_implementation = "eager"
        self.lm = LlamaForCausalLM(llama).eval()
        lm_weights = {k: v.float() for k, v in weights.items() if k.startswith(("model.layers.", "model.embed_tokens.",
                                                                               "model.norm.", "lm_head."))}
        missing, unexpected = self.lm.load_state_dict(lm_weights, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and llama.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"LLaMA: missing {missing}, unexpected {unexpected}")
        self.lm.generation_config = GenerationConfig(
            do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=c.get("pad_token_id")
        )
        self.torch = torch

    # -- features

    def video_features(self, pixel_values_videos):
        """[1, T, 3, H, W] (the engine's layout) -> per-frame features [T, N, hidden]."""
        t = self.torch.from_numpy(pixel_values_videos).permute(0, 2, 1, 3, 4)  # the original's [B, C, T, H, W]
        states = self.towers["video"](t)
        return self.projector(states[self.select_layer])[0]  # feature_select returns all tokens

    def image_features(self, pixel_values):
        """[1, 3, H, W] -> [N, hidden] (`patch` drops CLS)."""
        states = self.towers["image"](self.torch.from_numpy(pixel_values))
        feats = states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        return self.projector(feats)[0]

    # -- language model

    def embeds(self, ids, features):
        """prepare_inputs_labels_for_multimodal: text embeddings with one feature block per marker."""
        embed = self.lm.get_input_embeddings()
        parts, text, blocks = [], [], iter(features)
        for i in ids + [None]:
            if i is None or i == IMAGE_TOKEN_INDEX:
                if text:
                    parts.append(embed(self.torch.tensor(text)))
                    text = []
                if i == IMAGE_TOKEN_INDEX:
                    parts.append(next(blocks))
            else:
                text.append(i)
        if next(blocks, None) is not None:
            raise RuntimeError("more feature blocks than markers")
        return self.torch.cat(parts)[None]

    def logits(self, embeds):
        return self.lm(inputs_embeds=embeds).logits[0].float().numpy()

    def greedy(self, embeds, n):
        out = self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=self.torch.ones(embeds.shape[:2], dtype=self.torch.long),
            do_sample=False,
            max_new_tokens=n,
            return_dict_in_generate=True,
            output_logits=True,
        )
        tokens = out.sequences[0, -n:].tolist()
        if out.sequences.shape[1] != n:
            raise RuntimeError(f"generate returned {out.sequences.shape[1]} ids, expected {n}")
        return tokens, self.torch.cat(out.logits, dim=0).float().numpy()


# ----------------------------------------------------------------------------- preprocessing


def short_side_scale(x, size):
    """pytorchvideo.transforms.functional.short_side_scale (x: [C, T, H, W] float)."""
    import torch

    _, _, h, w = x.shape
    if w < h:
        new_h, new_w = int(math.floor((float(h) / w) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(w) / h) * size))
    return torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)


def center_crop_video(x, size):
    """torchvision _functional_video.center_crop (offsets rounded by Python's round)."""
    h, w = x.shape[-2:]
    i, j = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., i:i + size, j:j + size]


def original_video_transform(frames, size):
    """LanguageBind's video transform (decord backend) without RandomHorizontalFlipVideo.
    frames: uint8 [T, H, W, 3] -> float32 [T, 3, size, size]."""
    import torch

    x = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (T, H, W, C) -> (C, T, H, W)
    x = x / 255.0
    mean = torch.as_tensor(OPENAI_DATASET_MEAN, dtype=x.dtype)[:, None, None, None]
    std = torch.as_tensor(OPENAI_DATASET_STD, dtype=x.dtype)[:, None, None, None]
    x = x.sub_(mean).div_(std)
    x = center_crop_video(short_side_scale(x, size), size)
    return x.permute(1, 0, 2, 3).contiguous().numpy()


def original_image_transform(image, size):
    """process_images with image_aspect_ratio 'pad': expand2square(mean color), then
    LanguageBind's image transform. image: uint8 [H, W, 3] -> float32 [3, size, size]."""
    from PIL import Image
    from torchvision import transforms

    pil = Image.fromarray(image)
    width, height = pil.size
    fill = tuple(int(x * 255) for x in OPENAI_DATASET_MEAN)
    if width != height:
        side = max(width, height)
        square = Image.new(pil.mode, (side, side), fill)
        square.paste(pil, ((side - width) // 2, (side - height) // 2))
        pil = square
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
    ])
    return transform(pil).numpy()


# ----------------------------------------------------------------------------- goldens


def write_goldens(args):
    import torch
    import transformers
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    model = OriginalVideoLlava(args.model, args.video_tower, args.image_tower)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    placeholder = tokenizer.convert_tokens_to_ids("<unk>")
    fixture, n = FixtureWriter(args.out), args.new_tokens
    frames, size, per_frame = model.frames, model.image_size, model.tokens_per_frame
    per_image = per_frame - (1 if model.select_feature == "patch" else 0)

    rng = np.random.default_rng(args.seed)
    video_pixels = (rng.standard_normal((1, frames, 3, size, size)) * 0.5).astype(np.float32)
    image_pixels = (np.random.default_rng(args.seed + 1).standard_normal((1, 3, size, size)) * 0.5).astype(np.float32)
    fixture.save("pixel_values_videos.npy", video_pixels)
    fixture.save("pixel_values.npy", image_pixels)

    video_text = first_turn(frames, QUESTION)
    image_text = first_turn(1, IMAGE_QUESTION)
    text_text = first_turn(0, TEXT_QUESTION)
    appended_text = f"</s>USER: {QUESTION_2} ASSISTANT:"
    marked = {k: tokenizer_image_token(t, tokenizer) for k, t in
              [("video", video_text), ("image", image_text), ("text", text_text)]}
    appended_ids = tokenizer(appended_text, add_special_tokens=False).input_ids
    video_ids = expand_markers(marked["video"], per_frame, placeholder)
    image_ids = expand_markers(marked["image"], per_image, placeholder)

    with torch.inference_mode():
        vfeats = model.video_features(video_pixels)  # [T, N, hidden]
        ifeats = model.image_features(image_pixels)  # [N, hidden]
        fixture.save("video_features.npy", vfeats.reshape(1, -1, vfeats.shape[-1]).numpy())
        fixture.save("image_features.npy", ifeats[None].numpy())
        video_blocks = list(vfeats)

        embeds = model.embeds(marked["video"], video_blocks)
        fixture.save("inputs_embeds.npy", embeds[0].numpy())
        logits = model.logits(embeds)
        fixture.save("logits.npy", logits)
        tokens, step_logits = model.greedy(embeds, n)
        fixture.save("greedy_logits.npy", step_logits)
        if tokens[0] != int(logits[-1].argmax()):
            raise RuntimeError("first greedy token differs from the argmax of the prefill logits")
        forced = model.logits(model.embeds(marked["video"] + tokens[:-1], video_blocks))[len(video_ids) - 1:]
        forced_check = {
            "argmax_equal": forced.argmax(-1).tolist() == tokens,
            "max_abs_diff_vs_cached_decode": float(np.max(np.abs(forced - step_logits))),
        }

        turn2_marked = marked["video"] + tokens + appended_ids
        tokens2, logits2 = model.greedy(model.embeds(turn2_marked, video_blocks), n)
        fixture.save("second_turn_greedy_logits.npy", logits2)
        image_tokens, image_logits = model.greedy(model.embeds(marked["image"], [ifeats]), IMAGE_NEW_TOKENS)
        fixture.save("image_greedy_logits.npy", image_logits)
        text_embeds = model.embeds(marked["text"], [])
        fixture.save("text_only_last_logits.npy", model.logits(text_embeds)[-1])
        text_tokens, text_logits = model.greedy(text_embeds, TEXT_NEW_TOKENS)
        fixture.save("text_only_greedy_logits.npy", text_logits)

    preprocess = write_preprocess_goldens(fixture, args.seed, size)
    golden = {
        "generated_by": "tools/oracle_original.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "layout": "original",
        "model_sha256": sha256_files(args.model, "*.safetensors"),
        "seed": args.seed,
        "new_tokens": n,
        "model": {
            "frames": frames,
            "image_size": size,
            "tokens_per_frame": per_frame,
            "video_tokens": per_frame * frames,
            "image_tokens": per_image,
            "video_token_index": placeholder,
            "image_token_index": placeholder,
            "placeholder": "<unk> (the original's IMAGE_TOKEN_INDEX -200 has no embedding row)",
            "vision_feature_layer": model.select_layer,
            "vision_feature_select_strategy": model.select_feature,
            "vocab_size": model.config["vocab_size"],
            "hidden_size": model.config["hidden_size"],
            "num_hidden_layers": model.config["num_hidden_layers"],
            "num_key_value_heads": model.config.get("num_key_value_heads", model.config["num_attention_heads"]),
            "head_dim": model.config["hidden_size"] // model.config["num_attention_heads"],
        },
        "prompt": QUESTION,
        "prompt_text": video_text,
        "input_ids_with_markers": marked["video"],
        "input_ids": video_ids,
        "greedy_tokens": tokens,
        "greedy_text": tokenizer.decode(tokens),
        "greedy_logits_file": "greedy_logits.npy",
        "greedy_min_top2_margin": top2_margin(step_logits),
        "greedy_teacher_forced_check": forced_check,
        "second_turn": {
            "prompt": QUESTION_2,
            "appended_text": appended_text,
            "appended_ids": appended_ids,
            "appended_tokenization": "tokenizer(appended_text, add_special_tokens=False): no BOS; "
            "input_ids = turn-1 input_ids + turn-1 greedy_tokens + appended_ids",
            "input_ids": video_ids + tokens + appended_ids,
            "greedy_tokens": tokens2,
            "greedy_text": tokenizer.decode(tokens2),
            "greedy_logits_file": "second_turn_greedy_logits.npy",
            "greedy_min_top2_margin": top2_margin(logits2),
        },
        "image_prompt": {
            "prompt": IMAGE_QUESTION, "prompt_text": image_text, "input_ids_with_markers": marked["image"],
            "input_ids": image_ids, "greedy_tokens": image_tokens, "greedy_text": tokenizer.decode(image_tokens),
            "greedy_logits_file": "image_greedy_logits.npy", "greedy_min_top2_margin": top2_margin(image_logits),
        },
        "text_only": {
            "prompt": TEXT_QUESTION, "prompt_text": text_text, "input_ids": marked["text"],
            "last_logits_file": "text_only_last_logits.npy", "greedy_tokens": text_tokens,
            "greedy_text": tokenizer.decode(text_tokens), "greedy_logits_file": "text_only_greedy_logits.npy",
            "greedy_min_top2_margin": top2_margin(text_logits),
        },
        "preprocess": preprocess,
        "files": fixture.files,
    }
    (fixture.dir / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    (fixture.dir / "README.md").write_text(fixture_readme(golden))
    print(f"wrote {fixture.dir} ({len(fixture.files)} arrays, greedy: {tokens[:8]}...)")
    if not forced_check["argmax_equal"]:
        print("ERROR: teacher-forced argmax differs from generate()", file=sys.stderr)
        return 1
    return 0


def write_preprocess_goldens(fixture, seed, size):
    """Raw uint8 frames and what the original transforms make of them (non-square, so the
    short-side resize and the half-pixel crop offsets are exercised; one video is upscaled)."""
    rng = np.random.default_rng(seed + 2)
    cases = {}
    videos = {"landscape": (size + 10, 2 * size), "portrait": (2 * size + 8, size + 1), "upscaled": (size // 2, size - 3)}
    for name, (h, w) in videos.items():
        raw = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)  # two frames show the layout
        fixture.save(f"preprocess_video_{name}_frames.npy", raw)
        fixture.save(f"preprocess_video_{name}_pixel_values.npy", original_video_transform(raw, size))
        cases[f"video_{name}"] = {"frames": f"preprocess_video_{name}_frames.npy",
                                  "pixel_values": f"preprocess_video_{name}_pixel_values.npy"}
    for name, (h, w) in {"wide": (size + 6, 2 * size + 3), "square": (size + 20, size + 20)}.items():
        raw = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        fixture.save(f"preprocess_image_{name}_frame.npy", raw)
        fixture.save(f"preprocess_image_{name}_pixel_values.npy", original_image_transform(raw, size)[None])
        cases[f"image_{name}"] = {"frame": f"preprocess_image_{name}_frame.npy",
                                  "pixel_values": f"preprocess_image_{name}_pixel_values.npy"}
    return {"size": size, "crop": size, "cases": cases,
            "video": "x/255, NormalizeVideo, ShortSideScale (bilinear interpolate), CenterCropVideo; no flip",
            "image": "expand2square(int(mean*255)), ToTensor, Resize(bicubic, antialias), CenterCrop, Normalize"}


def fixture_readme(golden):
    return common_fixture_readme(
        golden,
        "Golden fixture: original Video-LLaVA layout",
        "Produced by the PyTorch reference of the original model (LanguageBind video tower with temporal\n"
        "attention on transformers' CLIP modules, LLaMA from transformers; fp32, eager attention, CPU):",
        "Format: tools/README.md (as tools/oracle.py writes it), plus `input_ids_with_markers` (the\n"
        "original ids, -200 per marker) and `preprocess` (raw frames and the original transforms' output).\n"
        "Do not edit by hand; regenerate with tools/make_goldens.sh.",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("goldens", help="write golden fixtures from an original-layout checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="fixture directory to write")
    p.add_argument("--video-tower", help="LanguageBind video tower directory (default: found in the checkpoint)")
    p.add_argument("--image-tower", help="LanguageBind image tower directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=32)
    p.set_defaults(func=write_goldens)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
