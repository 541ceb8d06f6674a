"""Resolves a sparse Video-LLaVA config.json with transformers and writes the values the
exporter reads (tests/fixtures/config/resolved_transformers<major>.json).

    python tools/config_defaults.py [--config tests/fixtures/config/published_sparse.json] [--out FILE]

Needs only `transformers` (configs import without torch).
"""
import argparse
import json
from pathlib import Path

import transformers
from transformers import VideoLlavaConfig

ROOT = Path(__file__).resolve().parent.parent
TEXT = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
        "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
        "attention_bias", "mlp_bias"]
VISION = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "image_size", "patch_size", "hidden_act", "layer_norm_eps", "num_channels"]
TOP = ["image_token_index", "video_token_index", "projector_hidden_act", "vision_feature_layer",
       "vision_feature_select_strategy", "image_seq_length", "video_seq_length",
       "multimodal_projector_bias", "tie_word_embeddings"]


def rope_theta(text: dict) -> float:
    """4.x keeps `rope_theta`; 5.x moves it into `rope_parameters`."""
    params = text.get("rope_parameters") or {}
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=ROOT / "tests/fixtures/config/published_sparse.json", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    major = transformers.__version__.split(".")[0]
    out = args.out or ROOT / f"tests/fixtures/config/resolved_transformers{major}.json"
    d = VideoLlavaConfig.from_dict(json.loads(args.config.read_text())).to_dict()
    text, vision = d["text_config"], d["vision_config"]
    resolved = {
        "transformers_version": transformers.__version__,
        "source": str(args.config.resolve().relative_to(ROOT)) if args.config.resolve().is_relative_to(ROOT) else str(args.config),
        # 4.42 has no head_dim field: hidden_size // num_attention_heads.
        "text_config": {k: text.get(k, text["hidden_size"] // text["num_attention_heads"] if k == "head_dim" else None)
                        for k in TEXT} | {"rope_theta": rope_theta(text)},
        "vision_config": {k: vision.get(k) for k in VISION},
        # `multimodal_projector_bias` is absent before 4.5x: the projector always had biases.
        **{k: d.get(k, True if k == "multimodal_projector_bias" else None) for k in TOP},
    }
    out.write_text(json.dumps(resolved, indent=2) + "\n")
    print(f"wrote {out} (transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
