"""Write the shipped calibration sets: ``python -m edgemm.zoo.calib [--out calib] [--n 128]``.

One ``<name>.npz`` per zoo model, keys = the model's input names, axis 0 = samples, no labels (the
format ``edgemm compile --calib`` reads; see calib/README.md). Compressed: they live in the repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from . import make_data, names
from ._atomic import atomic_open
from .datasets import DEFAULT_SIZES


def write_calib(name: str, out_dir: Path, n: int = DEFAULT_SIZES["calib"]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.npz"
    with atomic_open(path) as handle:
        np.savez_compressed(handle, **make_data(name, "calib", n))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgemm.zoo.calib", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("calib"), help="folder (default: ./calib)")
    parser.add_argument("--n", type=int, default=DEFAULT_SIZES["calib"], help="samples per set")
    parser.add_argument("--name", action="append", choices=names(), help="model (repeatable; default: all)")
    args = parser.parse_args(argv)
    for name in args.name or names():
        path = write_calib(name, args.out, args.n)
        print(f"{path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
