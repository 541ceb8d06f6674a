#!/usr/bin/env python3
"""Checks that `.bin` files written by `vl-export synth --weights-format bin` load as PyTorch
checkpoints.

With torch installed: `torch.load(path, weights_only=True)` on every file, each tensor checked
against the index. Without it: the same structure checked with the standard library only:
`zipfile` (CRCs, STORED entries, 64-byte aligned data as torch's writer aligns it, the
`archive/` layout) and `pickle` with torch's weights-only allow-list and persistent ids.

Usage: tools/check_torch_bin.py CHECKPOINT_DIR
"""
import collections
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
}
WIDTH = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2}


def with_torch(path):
    import torch

    return {k: tuple(v.shape) for k, v in torch.load(path, weights_only=True).items()}


def without_torch(path):
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        assert bad is None, f"{path}: bad CRC in {bad}"
        names = z.namelist()
        assert names[0] == "archive/data.pkl", names[:3]
        assert z.read("archive/byteorder") == b"little"
        assert z.read("archive/version") == b"3\n"
        raw = open(path, "rb").read()
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED, info.filename
            if info.filename.startswith("archive/data/"):
                # The local header's extra field (the padding) differs from the central one.
                local_extra = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
                start = info.header_offset + 30 + len(info.filename) + local_extra
                assert start % 64 == 0, f"{info.filename} data at {start}, not 64-byte aligned"

        def rebuild(storage, offset, size, stride, requires_grad, hooks, metadata=None):
            kind, key, numel = storage
            data = z.read(f"archive/data/{key}")
            assert len(data) == numel * WIDTH[kind], (key, len(data), numel)
            assert offset + numel_of(size) <= numel
            return tuple(size)

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in ALLOWED:
                    raise pickle.UnpicklingError(f"refused {module}.{name}")
                if module == "collections":
                    return collections.OrderedDict
                if name == "_rebuild_tensor_v2":
                    return rebuild
                return name

            def persistent_load(self, pid):
                kind, storage, key, location, numel = pid
                assert kind == "storage" and location == "cpu"
                return (storage, key, numel)

        return dict(Unpickler(io.BytesIO(z.read("archive/data.pkl"))).load())


def numel_of(size):
    n = 1
    for d in size:
        n *= d
    return n


def main():
    root = Path(sys.argv[1])
    index = json.loads((root / "pytorch_model.bin.index.json").read_text())["weight_map"]
    try:
        import torch  # noqa: F401

        load, how = with_torch, "torch.load(weights_only=True)"
    except ImportError:
        load, how = without_torch, "zipfile + a weights-only pickle.Unpickler"
    seen = {}
    for shard in sorted(set(index.values())):
        for name, shape in load(root / shard).items():
            assert index[name] == shard, (name, shard)
            seen[name] = shape
    assert set(seen) == set(index), set(index) ^ set(seen)
    print(f"{len(seen)} tensors in {len(set(index.values()))} shards load with {how}")


if __name__ == "__main__":
    main()
