#!/usr/bin/env python3
"""PyTorch fp16 on the GPU, for tools/gpu-check.sh: what a transformers user gets by default (sdpa
attention) on the same checkpoint vl runs. Times the video tower on 8 frames, the prefill of a
prompt of --prompt-tokens ids, and greedy decoding at batch 1 and 8; prints one markdown row each."""
import argparse
import time

import torch
from transformers import VideoLlavaForConditionalGeneration


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1000.0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    model = VideoLlavaForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float16).cuda().eval()
    cfg = model.config
    vision = cfg.vision_config
    px = torch.randn(1, 8, 3, vision.image_size, vision.image_size, dtype=torch.float16, device="cuda")
    vocab = cfg.text_config.vocab_size
    print(f"| system | GPU | vision ms | prefill ms ({args.prompt_tokens} tokens) | batch | decode ms/token | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    gpu = torch.cuda.get_device_name(0)
    with torch.inference_mode():
        vision_ms = timed(lambda: model.get_video_features(pixel_values_videos=px))
        for batch in (1, 8):
            ids = torch.randint(3, min(vocab, 30000), (batch, args.prompt_tokens), device="cuda")
            prefill_ms = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
            total_ms = timed(
                lambda: model.generate(input_ids=ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       do_sample=False),
                reps=1,
            )
            per_token = (total_ms - prefill_ms) / (args.new_tokens - 1)
            print(f"| PyTorch {torch.__version__} fp16 sdpa | {gpu} | {vision_ms:.1f} | {prefill_ms:.1f} | {batch} | "
                  f"{per_token:.2f} | {batch * 1000.0 / per_token:.0f} |")


if __name__ == "__main__":
    main()
