#!/usr/bin/env python3
"""Golden fixtures for the Rust video decode + preprocessing (runtime/tests/preprocess_parity.rs).

Makes two small test videos and a still image with ffmpeg, decodes the sampled video frames
the way `vl_runtime::video::decode_frames` does (ffmpeg `select` filter, `-fps_mode
passthrough`, rgb24 at full decoded size), checks that against a decode of every frame, runs
the transformers Video-LLaVA processors and writes into tests/fixtures/preprocess/:

    <name>.<ext>                 the test media
    pixel_values_<name>.npy      videos: [8, 3, 224, 224] float32 from VideoLlavaVideoProcessor
                                 images: [1, 3, 224, 224] float32 from VideoLlavaImageProcessor
    golden.json                  frame count, sizes, rotation, sampled indices, sha256 of each
                                 decoded rgb24 frame, tool versions, processor differences
    README.md                    how they were made

Run from the repository root:

    .oracle/bin/python tools/preprocess_golden.py

These are the two processors `VideoLlavaProcessor` uses in transformers 5: videos go through
`VideoLlavaVideoProcessor` (torchvision, uint8 antialiased bicubic), images through
`VideoLlavaImageProcessor` (Pillow bicubic). Same settings (shortest edge 224, center crop
224, x1/255, CLIP mean/std), slightly different resize arithmetic: the script records how far
Pillow is from torchvision on the video frames (`pillow_vs_torchvision_max_abs_diff`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FRAMES = 8
OUT_DIR = Path("tests/fixtures/preprocess")

# name -> file. Chosen for coverage:
# - landscape_vfr: odd size 481x271 (downscaled to 224 on the short side), VP9 in WebM,
#   variable frame rate (frame intervals grow), 30 frames.
# - portrait_rot90: 240x136 H.264 in MP4 with a 90-degree display matrix, so the decoded
#   frames are 136x240 (upscaled to 224 on the short side), 20 frames.
VIDEOS = {
    "landscape_vfr": "landscape_vfr.webm",
    "portrait_rot90": "portrait_rot90.mp4",
}
# name -> file: a 353x257 PNG (odd size, downscaled), read with Pillow as transformers'
# `load_image` does (lossless, so ffmpeg decodes the same pixels).
IMAGES = {"still_png": "still.png"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True)


def make_landscape_vfr(path: Path, _tmp: Path) -> None:
    src = (
        "testsrc2=size=482x272:rate=25:duration=1.2,format=rgb24,crop=481:271:0:0,"
        "setpts='(N+N*N/20)/25/TB'"
    )
    run(["ffmpeg", "-hide_banner", "-y", "-f", "lavfi", "-i", src, "-c:v", "libvpx-vp9",
         "-b:v", "250k", "-pix_fmt", "yuv420p", str(path)])


def make_portrait_rot90(path: Path, tmp: Path) -> None:
    plain = tmp / "plain.mp4"
    run(["ffmpeg", "-hide_banner", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=240x136:rate=30:duration=0.6667", "-frames:v", "20", "-c:v", "libx264",
         "-preset", "veryslow", "-crf", "30", "-pix_fmt", "yuv420p", str(plain)])
    # ffmpeg 5.1 writes a display matrix from the `rotate` tag only on a stream copy.
    run(["ffmpeg", "-hide_banner", "-y", "-i", str(plain), "-c", "copy",
         "-metadata:s:v:0", "rotate=90", str(path)])


def make_still(path: Path, _tmp: Path) -> None:
    run(["ffmpeg", "-hide_banner", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=354x258,format=rgb24,crop=353:257:1:1", "-frames:v", "1", str(path)])


MAKERS = {"landscape_vfr": make_landscape_vfr, "portrait_rot90": make_portrait_rot90,
          "still_png": make_still}


def probe(path: Path) -> dict:
    out = run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0",
               "-show_entries", "stream=width,height,nb_read_packets:stream_side_data=rotation",
               "-of", "json", str(path)]).stdout
    s = json.loads(out)["streams"][0]
    rot = 0
    for sd in s.get("side_data_list", []):
        if "rotation" in sd:
            rot = int(sd["rotation"]) % 360
    w, h = int(s["width"]), int(s["height"])
    if rot % 180 != 0:
        w, h = h, w
    return {"n_frames": int(s["nb_read_packets"]), "width": w, "height": h, "rotation": rot}


def decode_all(path: Path, w: int, h: int) -> np.ndarray:
    raw = run(["ffmpeg", "-hide_banner", "-v", "error", "-i", str(path), "-map", "0:v:0",
               "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def decode_selected(path: Path, indices: list[int], w: int, h: int) -> np.ndarray:
    """The command vl_runtime::video::decode_frames runs: each distinct index once."""
    distinct = sorted(set(indices))
    select = "select='" + "+".join(f"eq(n\\,{i})" for i in distinct) + "'"
    raw = run(["ffmpeg", "-hide_banner", "-v", "error", "-i", str(path), "-map", "0:v:0",
               "-vf", select, "-fps_mode", "passthrough", "-frames:v", str(len(distinct)),
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]).stdout
    got = np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)
    pos = {idx: k for k, idx in enumerate(distinct)}
    return np.stack([got[pos[i]] for i in indices])


def image_processor(frames: np.ndarray) -> np.ndarray:
    """VideoLlavaImageProcessor (Pillow) on HWC uint8 frames -> [N, 3, 224, 224]."""
    from transformers import VideoLlavaImageProcessor

    proc = VideoLlavaImageProcessor()
    out = proc(images=list(frames), return_tensors="np", input_data_format="channels_last",
               return_legacy_image_output=False)
    return np.asarray(out["pixel_values"], dtype=np.float32)


def video_processor(frames: np.ndarray) -> np.ndarray:
    """VideoLlavaVideoProcessor (torchvision) on [F, H, W, 3] uint8 -> [F, 3, 224, 224]."""
    import torch
    from transformers import VideoLlavaVideoProcessor

    proc = VideoLlavaVideoProcessor()
    out = proc(videos=[torch.from_numpy(frames.copy())], return_tensors="np")
    return np.asarray(out["pixel_values_videos"], dtype=np.float32)[0]


def video_golden(out: Path, name: str, path: Path) -> dict:
    info = probe(path)
    w, h = info["width"], info["height"]
    everything = decode_all(path, w, h)
    assert len(everything) == info["n_frames"], (name, len(everything), info)
    indices = np.linspace(0, info["n_frames"] - 1, FRAMES).astype(int).tolist()
    frames = decode_selected(path, indices, w, h)
    assert np.array_equal(frames, everything[indices]), f"{name}: select != full decode"

    pv = video_processor(frames)
    assert pv.shape == (FRAMES, 3, 224, 224), pv.shape
    np.save(out / f"pixel_values_{name}.npy", pv)
    pil_diff = float(np.abs(image_processor(frames) - pv).max())
    print(f"{name}: {info} indices={indices} {path.stat().st_size} B; "
          f"Pillow vs torchvision max diff {pil_diff:.4f}")
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        **info,
        "indices": indices,
        "frame_sha256": [hashlib.sha256(f.tobytes()).hexdigest() for f in frames],
        "processor": "VideoLlavaVideoProcessor",
        "pillow_vs_torchvision_max_abs_diff": pil_diff,
    }


def image_golden(out: Path, name: str, path: Path) -> dict:
    import PIL.Image

    image = PIL.Image.open(path).convert("RGB")
    pv = image_processor(np.asarray(image)[None])
    assert pv.shape == (1, 3, 224, 224), pv.shape
    np.save(out / f"pixel_values_{name}.npy", pv)
    print(f"{name}: {image.size} {path.stat().st_size} B")
    return {"file": path.name, "bytes": path.stat().st_size, "width": image.width,
            "height": image.height, "processor": "VideoLlavaImageProcessor"}


def versions() -> dict:
    import PIL
    import torch
    import torchvision
    import transformers

    ff = run(["ffmpeg", "-version"]).stdout.decode().splitlines()[0]
    return {"ffmpeg": ff, "transformers": transformers.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--keep-media", action="store_true",
                    help="reuse the media files already in --out instead of remaking them")
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        print("ffmpeg/ffprobe not found: apt-get install ffmpeg", file=sys.stderr)
        return 1
    try:
        import torchvision  # noqa: F401  (VideoLlavaVideoProcessor needs it)
    except ImportError:
        print("torchvision is missing from this venv: VideoLlavaVideoProcessor needs it",
              file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)

    golden = {"frames": FRAMES, "versions": versions(), "videos": {}, "images": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for table, make_golden in ((VIDEOS, video_golden), (IMAGES, image_golden)):
            for name, file in table.items():
                path = args.out / file
                if not (args.keep_media and path.exists()):
                    MAKERS[name](path, Path(tmp))
                kind = "videos" if table is VIDEOS else "images"
                golden[kind][name] = make_golden(args.out, name, path)

    (args.out / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
    (args.out / "README.md").write_text(README.format(**golden["versions"]))
    return 0


README = """# Preprocessing golden fixtures

Made by `tools/preprocess_golden.py`, from the repository root:

```sh
.oracle/bin/python tools/preprocess_golden.py
```

Read by `runtime/tests/preprocess_parity.rs`.

| file | what |
|---|---|
| `landscape_vfr.webm` | testsrc2, 481x271 (odd), VP9, 30 frames, variable frame rate |
| `portrait_rot90.mp4` | testsrc2, 240x136 H.264, 20 frames, 90-degree display matrix: decodes to 136x240 |
| `still.png` | testsrc2, 353x257 (odd) |
| `pixel_values_<video>.npy` | [8, 3, 224, 224] float32: `VideoLlavaVideoProcessor` on the 8 sampled frames |
| `pixel_values_still_png.npy` | [1, 3, 224, 224] float32: `VideoLlavaImageProcessor` on the PNG read by Pillow |
| `golden.json` | frame count, decoded size, rotation, sampled indices (`numpy.linspace(0, n-1, 8).astype(int)`), sha256 of each decoded rgb24 frame, tool versions |

These are the processors `VideoLlavaProcessor` uses in transformers 5: videos resize with
torchvision (uint8 antialiased bicubic), images with Pillow (bicubic); both shortest edge 224,
center crop 224, x1/255, CLIP mean/std. On the video frames the two differ by up to
`pillow_vs_torchvision_max_abs_diff` (recorded per video in `golden.json`).

The video frames are decoded by ffmpeg exactly as `vl_runtime::video::decode_frames` does
(`select='eq(n\\\\,i)+...'`, `-fps_mode passthrough`, rgb24 at full size), and the script
checks that this equals indexing a decode of every frame. The frame hashes depend on the
ffmpeg build (its yuv->rgb conversion); the Rust test enforces them only when ffmpeg's
version line matches the one below.

Made with: {ffmpeg}; transformers {transformers}; torch {torch}; torchvision {torchvision};
Pillow {pillow}; numpy {numpy}.
"""

if __name__ == "__main__":
    sys.exit(main())
