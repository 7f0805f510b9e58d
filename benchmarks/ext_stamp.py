"""The stamp of a prebuilt extension: which sources, torch and GPU architectures a `_C.so` was built from.

A lent GPU's minutes are few, and building the extension there takes one or two of them. The extension is built
against Python's limited API (setup.py), so one built here against the very torch the GPU machine has (same version
and commit, a different Python) loads there: benchmarks/prebuild_device_ext.sh builds it and writes the stamp,
gpu_check.sh's build stage uses it only when the stamp matches that machine's torch and the sources it is about to
test, and builds from source otherwise.

    python benchmarks/ext_stamp.py write DIR --arch 9.0   # after a build: DIR/stamp.json for DIR/_C.so
    python benchmarks/ext_stamp.py check DIR              # exit 0 when DIR/_C.so fits this torch and these sources
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_files(root: Path = ROOT) -> list[Path]:
    """Every file the extension is built from: csrc/ and setup.py."""
    files = [p for p in (root / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files + [root / "setup.py"])


def source_hash(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def current(arch: str | None = None) -> dict:
    import torch

    return {"torch": torch.__version__, "torch_git": torch.version.git_version, "cuda": torch.version.cuda,
            "arch": arch if arch is not None else os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
            "sources": source_hash()}


def write(dirpath: Path, arch: str) -> dict:
    so = dirpath / "_C.so"
    if not so.is_file():
        raise FileNotFoundError(f"{so} does not exist: build the extension first")
    stamp = dict(current(arch), so_sha256=file_hash(so))
    (dirpath / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def mismatches(dirpath: Path, arch: str | None = None) -> list[str]:
    """Why DIR/_C.so does not fit here ([] when it does)."""
    so, stamp_file = dirpath / "_C.so", dirpath / "stamp.json"
    if not so.is_file() or not stamp_file.is_file():
        return [f"no {so.name} with a stamp.json in {dirpath}"]
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError) as exc:
        return [f"unreadable stamp {stamp_file}: {exc}"]
    want = dict(current(arch), so_sha256=file_hash(so))
    return [f"{key}: built for {stamp.get(key)!r}, here {value!r}" for key, value in want.items()
            if stamp.get(key) != value]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["write", "check"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST of the build (default: the environment's)")
    a = ap.parse_args(argv)
    if a.action == "write":
        print(json.dumps(write(a.dir, a.arch if a.arch is not None else os.environ.get("TORCH_CUDA_ARCH_LIST", ""))))
        return 0
    bad = mismatches(a.dir, a.arch)
    for line in bad:
        print(f"prebuilt extension does not fit: {line}")
    if not bad:
        print(f"prebuilt extension {a.dir / '_C.so'} fits this torch and these sources")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
