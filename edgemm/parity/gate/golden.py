"""A baseline's files: NAME.json (context, statistics, digests, task metric, latency) and the golden
outputs NAME.npz beside it (float16 by default, never pickled); recording and loading them."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ...data import check_npz_sizes
from ...errors import InputError, first_line
from ...outputs import check_output_file, output_file, write_output_text
from .anchor import ANCHOR_WIDTH_RANGE
from .context import bundle_context
from .schema import validate_baseline

if TYPE_CHECKING:
    from ...runtime.manifest import Manifest

FORMAT = "edgemm-baseline"
FORMAT_VERSION = 1
GOLDEN_MODES = ("float16", "float32", "none")
FLOAT16_MAX = 60000.0  # beyond this a float16 golden would overflow (65504) or lose too much
MAX_BASELINE_BYTES = 64 << 20


def _digest(batches: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in batches:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _stats(batches: list[np.ndarray]) -> dict:
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in batches])
    finite = flat[np.isfinite(flat)]
    if not finite.size:
        return {"count": int(flat.size), "finite": 0}
    return {"count": int(flat.size), "finite": int(finite.size), "mean": float(finite.mean()),
            "std": float(finite.std()), "min": float(finite.min()), "max": float(finite.max()),
            "abs_max": float(np.abs(finite).max())}


def _golden_dtype(batches: list[np.ndarray], mode: str) -> str | None:
    kind = batches[0].dtype.kind
    if mode == "none":
        return None
    if kind in "iub":
        return batches[0].dtype.str  # integers are stored exactly
    if mode == "float16" and all(np.isfinite(a).all() and (not a.size or np.abs(a).max() < FLOAT16_MAX)
                                 for a in batches):
        return "float16"
    return "float32"


def check_baseline_outputs(save, inputs: Mapping[str, object], outputs: Mapping[str, object] | None = None) -> None:
    """--save-baseline names a .json, and it and its golden .npz overwrite no input (nor another output)."""
    path = _check_baseline_path(Path(save), "--save-baseline")
    others = {k: v for k, v in (outputs or {}).items() if not k.startswith("--save-baseline")}
    for written in (path, golden_path(path)):
        check_output_file(written, field="--save-baseline", inputs=inputs, outputs=others)


def golden_path(baseline_path: Path) -> Path:
    return Path(baseline_path).with_suffix(".npz")


def _check_baseline_path(path: Path, flag: str) -> Path:
    path = Path(path)
    if path.suffix != ".json":
        raise InputError("a baseline is a .json file (its golden outputs go beside it as .npz)", file=path,
                         field=flag, fix=f"e.g. {flag} baselines/{path.stem or 'model'}.json")
    return path


def save_baseline(path, report: Mapping, manifest: "Manifest", outputs: list[dict[str, np.ndarray]], *,
                  batch_size: int, golden: str = "float16", latency: Mapping | None = None) -> Path:
    """Write NAME.json (+ NAME.npz unless golden == "none") from a finished verification run.
    ``latency`` is the summary from ``measure_gate_latency`` (None: no latency recorded)."""
    path = _check_baseline_path(path, "--save-baseline")
    if golden not in GOLDEN_MODES:
        raise InputError(f"unknown golden mode {golden!r}", field="--golden", fix=f"use {', '.join(GOLDEN_MODES)}")
    if not outputs:
        raise InputError("the run produced no outputs to record", field="--data", fix="pass non-empty eval data")
    names = manifest.output_names
    arrays: dict[str, np.ndarray] = {}
    entries = {}
    for j, name in enumerate(names):
        batches = [b[name] for b in outputs]
        dtype = _golden_dtype(batches, golden)
        entry = {"dtype": batches[0].dtype.str, "batch_shapes": [list(b.shape) for b in batches],
                 "sha256": _digest(batches), "stats": _stats(batches), "golden_dtype": dtype,
                 "golden_error": 0.0}
        if dtype is not None:
            stored = [b.astype(dtype) for b in batches]
            if dtype == "float16":  # the storage rounding, added to the max-abs limit at check time
                entry["golden_error"] = max(float(np.abs(s.astype(np.float64) - b).max()) if b.size else 0.0
                                            for s, b in zip(stored, batches))
            for i, s in enumerate(stored):
                arrays[f"o{j}_b{i}"] = s
        entries[name] = entry
    npz = golden_path(path)
    if arrays:
        with output_file(npz, field="--save-baseline") as f:
            np.savez_compressed(f, **arrays)
    elif npz.exists():
        npz.unlink()  # a stale golden file from an older baseline must not pair with this one
    task = report.get("task")
    data = report.get("data") or {}
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "context": bundle_context(manifest),
        "data": {"path": Path(str(data.get("path", ""))).name, "sha256": data.get("sha256"),
                 "samples": data.get("samples"), "batch_size": batch_size},
        "outputs": entries,
        "golden": {"mode": golden, "sha256": _sha256_file(npz) if arrays else None},
        "task": None if not task or "bundle" not in task else
        {"metric": task["metric"], "outputs": task["outputs"], "value": task["bundle"]},
        # The gate's single-threaded ratio, plus the run's percentiles with the deployment's threads.
        "latency": dict(latency, run_stats=report.get("latency")) if latency else None,
        "reference_parity": {n: {k: v for k, v in o.items() if k != "name"}
                             for n, o in (report.get("outputs") or {}).items()},
    }
    write_output_text(path, json.dumps(doc, indent=2) + "\n", field="--save-baseline")
    return path


def _sha256_file(path: Path) -> str:
    from ...runtime.bundle_files import sha256_file
    return sha256_file(path)


@dataclass
class Baseline:
    path: Path
    doc: dict

    @property
    def context(self) -> dict:
        return self.doc["context"]

    @property
    def batch_size(self) -> int:
        return int(self.doc["data"]["batch_size"])

    def golden(self) -> dict[str, list[np.ndarray]] | None:
        """Golden outputs per output name, one array per eval batch; None when only digests were kept."""
        if not self.doc["golden"].get("sha256"):
            return None
        npz = golden_path(self.path)
        if not npz.is_file():
            raise InputError("golden outputs file is missing", file=npz, field="golden",
                             fix="commit the .npz beside the baseline .json, or re-record with --save-baseline")
        if _sha256_file(npz) != self.doc["golden"]["sha256"]:
            raise InputError("golden outputs do not match their baseline .json (sha256 differs)", file=npz,
                             field="golden.sha256", fix="keep the .json and .npz from the same --save-baseline run")
        out: dict[str, list[np.ndarray]] = {}
        check_npz_sizes(npz, fix="re-record with --save-baseline")
        try:
            with np.load(npz, allow_pickle=False) as z:
                for j, (name, entry) in enumerate(self.doc["outputs"].items()):
                    if entry.get("golden_dtype") is None:
                        continue
                    out[name] = [z[f"o{j}_b{i}"] for i in range(len(entry["batch_shapes"]))]
                    for i, (array, shape) in enumerate(zip(out[name], entry["batch_shapes"])):
                        if not isinstance(array, np.ndarray) or list(array.shape) != shape:
                            raise InputError(f"golden batch {i} of {name!r} does not have the shape {shape} its "
                                             f"baseline records", file=npz, field=f"o{j}_b{i}",
                                             fix="re-record with --save-baseline")
        except (ValueError, KeyError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"cannot read golden outputs ({first_line(exc, 200)})", file=npz,
                             fix="re-record with --save-baseline") from exc
        return out


def load_baseline(path) -> Baseline:
    path = _check_baseline_path(path, "--baseline")
    if not path.is_file():
        raise InputError("no such baseline", file=path, field="--baseline",
                         fix="record one first: edgemm verify BUNDLE --data EVAL --save-baseline " + str(path))
    if path.stat().st_size > MAX_BASELINE_BYTES:
        raise InputError(f"is larger than {MAX_BASELINE_BYTES >> 20} MiB; not a baseline", file=path,
                         field="--baseline", fix="pass a file written by --save-baseline")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"invalid JSON ({exc})", file=path, fix="re-record with --save-baseline") from exc
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, an integer beyond Python's digit limit, nesting
        raise InputError(f"cannot be parsed ({type(exc).__name__}: {first_line(exc, 200)})", file=path,
                         fix="re-record with --save-baseline") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError("not an edgemm baseline", file=path, field="format",
                         fix="pass a file written by --save-baseline")
    version = doc.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise InputError(f"format_version {version!r} is not supported (reads 1..{FORMAT_VERSION})", file=path,
                         field="format_version", fix="upgrade edgemm or re-record the baseline")
    for key, kind in (("context", dict), ("data", dict), ("outputs", dict), ("golden", dict)):
        if not isinstance(doc.get(key), kind):
            raise InputError("missing or malformed", file=path, field=key, fix="re-record with --save-baseline")
    validate_baseline(doc, path, golden_modes=GOLDEN_MODES, anchor_width_range=ANCHOR_WIDTH_RANGE)
    return Baseline(path, doc)



def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number a baseline may hold")
