"""Helpers both Python references share (tools/oracle.py for the Hugging Face port,
tools/oracle_original.py for the original layout): checkpoint hashes, fixture files, the
margin that says how safe an argmax comparison is, and the fixture README."""

import hashlib
from pathlib import Path

import numpy as np


def sha256_files(directory, pattern):
    """sha256 of each file in `directory` matching `pattern`, by file name, read in 1 MiB chunks."""
    out = {}
    for path in sorted(Path(directory).glob(pattern)):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out[path.name] = digest.hexdigest()
    return out


def top2_margin(logits):
    """Smallest (top1 - top2) gap over rows: how safe an argmax comparison is."""
    part = np.sort(logits, axis=-1)[..., -2:]
    return float(np.min(part[..., 1] - part[..., 0]))


class FixtureWriter:
    """Saves .npy arrays into the fixture directory and remembers their shapes for golden.json."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files = {}

    def save(self, name, array):
        np.save(self.dir / name, array)
        self.files[name] = {"shape": list(array.shape), "dtype": str(array.dtype)}


def fixture_readme(golden, title, produced_by, format_note):
    """The README.md written beside a fixture: how it was made, from which checkpoint files."""
    return (
        f"# {title}\n\n"
        f"{produced_by}\n\n"
        f"    .oracle/bin/python {golden['generated_by']}\n\n"
        f"transformers {golden['versions']['transformers']}, torch {golden['versions']['torch']}.\n"
        "Checkpoint files (sha256):\n\n"
        + "".join(f"- `{k}`: `{v}`\n" for k, v in golden["model_sha256"].items())
        + f"\n{format_note}\n"
    )


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_pixel_config(side):
    """The CLIP pixel settings of Video-LLaVA's image and video processors, for `side`-pixel frames."""
    return {
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
