"""Baselines for the CI gate: record a bundle's outputs, task metric and latency once, then fail later
runs whose accuracy or latency drifted beyond tolerance.

A baseline is two files: ``NAME.json`` (context, statistics, digests, task metric, latency) and
``NAME.npz`` beside it (golden outputs, float16 by default, never pickled). Latency is gated as a ratio
(bundle / a fixed anchor workload timed interleaved in the same run, 10th percentiles) against the
baseline's stored ratio, never in absolute milliseconds, so that a busy CI machine slows both alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..data import check_npz_sizes
from ..display import md_code, md_text
from ..errors import InputError, first_line
from ..precision import label_of, parse as parse_precision
from ..outputs import check_output_file, output_file, write_output_text
from .baseline_schema import validate_baseline
from .thresholds import require_finite

FORMAT = "edgemm-baseline"
FORMAT_VERSION = 1
GOLDEN_MODES = ("float16", "float32", "none")
# The latency gate times the bundle and a fixed anchor, both single-threaded, interleaved, and compares
# the ratio of their 10th-percentile latencies with the baseline's. Measured on a shared 2-core machine:
# with ONNX Runtime's default threads the same bundle's ratio was bimodal (2.5 or 5.1, by how fast the
# pool thread woke), single-threaded it held within 2%; p50 ratios spread up to 5x under competing
# processes where p10 ratios spread 1.1-1.2x (noise only ever adds time). The anchor is a GEMV chain
# (8 x MatMul + Tanh, batch 1) run by ONNX Runtime, its weights sized like the bundle's files so that
# cache pressure slows it about as much as the bundle; a numpy anchor spread up to 1.5x.
ANCHOR_NAME = "ort-gemv-tanh-8-v1"
ANCHOR_DEPTH = 8
ANCHOR_WIDTH_RANGE = (32, 1448)   # 32 KB .. 67 MB of anchor weights
LATENCY_PERCENTILE = 10           # noise only ever adds time: a low percentile is the stable statistic
# The anchor graph, serialized once with onnx.helper (inputs x[1, width], w0..w7[width, width], output
# y): embedded so that a device with only numpy + onnxruntime can time it. Checked by tests.
_ANCHOR_ONNX = (
    "CAgSBmVkZ2VtbTr5BAoTCgF4CgJ3MBICbTAiBk1hdE11bAoOCgJtMBICdDAiBFRhbmgKFAoCdDAKAncxEgJtMSIGTWF0TXVsCg4K"
    "Am0xEgJ0MSIEVGFuaAoUCgJ0MQoCdzISAm0yIgZNYXRNdWwKDgoCbTISAnQyIgRUYW5oChQKAnQyCgJ3MxICbTMiBk1hdE11bAoO"
    "CgJtMxICdDMiBFRhbmgKFAoCdDMKAnc0EgJtNCIGTWF0TXVsCg4KAm00EgJ0NCIEVGFuaAoUCgJ0NAoCdzUSAm01IgZNYXRNdWwK"
    "DgoCbTUSAnQ1IgRUYW5oChQKAnQ1CgJ3NhICbTYiBk1hdE11bAoOCgJtNhICdDYiBFRhbmgKFAoCdDYKAnc3EgJtNyIGTWF0TXVs"
    "Cg0KAm03EgF5IgRUYW5oEhVlZGdlbW0tbGF0ZW5jeS1hbmNob3JaGAoBeBITChEIARINCgIIAQoHEgV3aWR0aFoeCgJ3MBIYChYI"
    "ARISCgcSBXdpZHRoCgcSBXdpZHRoWh4KAncxEhgKFggBEhIKBxIFd2lkdGgKBxIFd2lkdGhaHgoCdzISGAoWCAESEgoHEgV3aWR0"
    "aAoHEgV3aWR0aFoeCgJ3MxIYChYIARISCgcSBXdpZHRoCgcSBXdpZHRoWh4KAnc0EhgKFggBEhIKBxIFd2lkdGgKBxIFd2lkdGha"
    "HgoCdzUSGAoWCAESEgoHEgV3aWR0aAoHEgV3aWR0aFoeCgJ3NhIYChYIARISCgcSBXdpZHRoCgcSBXdpZHRoWh4KAnc3EhgKFggB"
    "EhIKBxIFd2lkdGgKBxIFd2lkdGhiGAoBeRITChEIARINCgIIAQoHEgV3aWR0aEIECgAQEQ=="
)
FLOAT16_MAX = 60000.0  # beyond this a float16 golden would overflow (65504) or lose too much


# --------------------------------------------------------------------------------------- tolerances

@dataclass(frozen=True)
class GateTolerances:
    """How far a run may drift from its baseline. Defaults follow the bundle's precision."""

    min_cosine: float             # mean per-sample cosine, now vs golden, every float output
    min_top1_agreement: float     # argmax agreement with the golden logits
    max_metric_drop: float        # task metric drop vs the baseline, percentage points
    max_abs_rel: float            # max |now - golden| / max |golden|
    min_exact_match: float = 1.0  # integer outputs
    latency_ratio: float = 1.5    # (bundle/anchor now) / (bundle/anchor at baseline) may not exceed this
    latency_any_host: bool = False  # gate latency even when the baseline came from another CPU/GPU

    @classmethod
    def for_precision(cls, precision: str, **overrides) -> "GateTolerances":
        bars = parse_precision(precision).spec   # a mixed bundle: its lowest precision's bars
        base = cls(bars.min_cosine, bars.min_top1_agreement, bars.max_metric_drop, bars.max_abs_rel)
        return base.with_overrides(**overrides)

    def with_overrides(self, **overrides) -> "GateTolerances":
        clean = {k: v for k, v in overrides.items() if v is not None}
        flags = {"min_cosine": "--baseline-min-cosine", "min_top1_agreement": "--baseline-min-top1",
                 "max_metric_drop": "--baseline-max-metric-drop", "max_abs_rel": "--baseline-max-abs-rel",
                 "latency_ratio": "--latency-tolerance", "min_exact_match": "min_exact_match",
                 "latency_any_host": "--latency-any-host"}
        for key, value in clean.items():
            if key not in flags:
                raise InputError(f"unknown tolerance {key!r}", field="tolerances",
                                 fix=f"use one of {', '.join(flags)}")
            if key != "latency_any_host":
                require_finite(value, flags[key])
            if key in ("min_cosine", "min_top1_agreement", "min_exact_match") and not -1.0 <= value <= 1.0:
                raise InputError(f"{value} is outside [-1, 1]", field=flags[key], fix="e.g. 0.999")
            if key in ("max_metric_drop", "max_abs_rel") and value < 0:
                raise InputError(f"{value} is negative", field=flags[key], fix="e.g. 0.5")
            if key == "latency_ratio" and value < 1.0:
                raise InputError(f"{value} is below 1 (a run would have to be faster than its baseline)",
                                 field=flags[key], fix="e.g. --latency-tolerance 1.5")
        return replace(self, **clean)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- context

def gpu_info() -> list[str]:
    """GPU names without importing CUDA: the NVIDIA driver's /proc entries, or a Jetson's board model."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                names.append(line.split(":", 1)[1].strip())
    board = Path("/proc/device-tree/model")
    if not names and board.is_file():
        names.append(board.read_text(errors="replace").strip("\x00\n "))
    return names


def bundle_context(manifest: Mapping) -> dict:
    """What a baseline is only valid for (backend, target, precision) plus what is worth reporting."""
    from ..hostinfo import cpu_info, versions

    files = json.dumps(manifest.get("files", {}), sort_keys=True).encode()
    return {
        "backend": manifest["backend"]["name"],
        "target": (manifest.get("target") or {}).get("name"),
        "precision": label_of(manifest.get("precision") or {}),
        "bundle": {"name": manifest.get("name"), "files_sha256": hashlib.sha256(files).hexdigest(),
                   "source_sha256": (manifest.get("source") or {}).get("sha256")},
        "compiled_with": manifest.get("versions") or {},
        "runtime_versions": versions(),
        "host": {"cpu": cpu_info(), "gpu": gpu_info()},
    }


def check_context(recorded: Mapping, now: Mapping, baseline_path: Path) -> tuple[list[str], bool]:
    """Refuse a baseline from another backend/target/precision. Returns (changes worth reporting,
    same_host), where same_host says whether latency ratios from both runs can be compared."""
    for key in ("backend", "target", "precision"):
        # Precision by label: a baseline of an older bundle holds "mixed:fp32+int8", the manifest now a section.
        same = (label_of(recorded.get(key)) == label_of(now.get(key)) if key == "precision"
                else recorded.get(key) == now.get(key))
        if not same:
            raise InputError(f"baseline was recorded for {key} {recorded.get(key)!r}, this bundle is "
                             f"{now.get(key)!r}", file=baseline_path, field=f"context.{key}",
                             fix="compare against a baseline recorded for this backend/target/precision, or "
                                 "record one with --save-baseline")
    changes = []
    rb, nb = recorded.get("bundle", {}), now.get("bundle", {})
    if rb.get("source_sha256") != nb.get("source_sha256"):
        changes.append("source model changed since the baseline")
    if rb.get("files_sha256") != nb.get("files_sha256"):
        changes.append("bundle files changed since the baseline")
    for section, label in (("compiled_with", "compiled with"), ("runtime_versions", "running on")):
        old, new = recorded.get(section) or {}, now.get(section) or {}
        for dist in sorted(set(old) | set(new)):
            if old.get(dist) != new.get(dist):
                changes.append(f"{label} {dist} {old.get(dist)} -> {new.get(dist)}")
    rh, nh = recorded.get("host", {}), now.get("host", {})
    same_host = (rh.get("cpu", {}).get("model") == nh.get("cpu", {}).get("model")
                 and rh.get("cpu", {}).get("int8_isa") == nh.get("cpu", {}).get("int8_isa")
                 and list(rh.get("gpu") or []) == list(nh.get("gpu") or []))
    if not same_host:
        changes.append(f"host changed: {_host_label(rh)} -> {_host_label(nh)}")
    return changes, same_host


def _host_label(host: Mapping) -> str:
    gpu = ", ".join(host.get("gpu") or [])
    return (host.get("cpu") or {}).get("model", "?") + (f" + {gpu}" if gpu else "")


# ------------------------------------------------------------------------------------- the recording

def anchor_width(bundle_dir: Path, manifest: Mapping) -> int:
    """Anchor width whose 8 weight matrices hold about as many bytes as the bundle's files."""
    size = sum((Path(bundle_dir) / rel).stat().st_size for rel in manifest.get("files", {})
               if (Path(bundle_dir) / rel).is_file())
    width = int(np.sqrt(max(size, 1) / 4 / ANCHOR_DEPTH))
    return int(np.clip(width, *ANCHOR_WIDTH_RANGE))


def anchor_workload(width: int) -> Callable[[], object]:
    """The fixed anchor, seeded, single-threaded, as a zero-argument callable (one batch-1 inference)."""
    import base64

    from ..onnx_io import cpu_session

    session = cpu_session(base64.b64decode(_ANCHOR_ONNX), intra_op_threads=1, inter_op_threads=1)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, width), dtype=np.float32)}
    for i in range(ANCHOR_DEPTH):
        feeds[f"w{i}"] = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
    return lambda: session.run(None, feeds)


def measure_gate_latency(bundle_dir, manifest: Mapping, feeds: Mapping[str, np.ndarray], width: int,
                         iterations: int, warmup: int = 5, **load_options) -> tuple[dict, dict[str, np.ndarray]]:
    """Time the bundle (its own single-threaded session) and the anchor, round-robin. Returns the
    summary the gate keeps and the per-call samples in ms (for plots)."""
    from .. import runtime
    from .latency import measure_interleaved

    from ..backends import registry

    options = {"intra_op_threads": 1} if registry.get(manifest["backend"]["name"]).thread_count else {}
    bundle = runtime.load(bundle_dir, **options, **load_options)
    checked = bundle.check_feeds(feeds)
    recorder = Recorder()
    fns = {"bundle": recorder("bundle.latency", lambda: bundle.run(checked)),
           "anchor": recorder("anchor.latency", anchor_workload(width))}
    stats = measure_interleaved(fns, warmup=warmup, iterations=iterations)
    samples = recorder.latency_ms(iterations)
    pct = LATENCY_PERCENTILE
    bundle_ms, anchor_ms = (float(np.percentile(samples[k], pct)) for k in ("bundle", "anchor"))
    summary = {"anchor": {"name": ANCHOR_NAME, "width": width}, "threads": 1 if options else None,
               "percentile": pct, "iterations": iterations, f"bundle_p{pct}_ms": bundle_ms,
               f"anchor_p{pct}_ms": anchor_ms, "ratio": bundle_ms / max(anchor_ms, 1e-12),
               "gate_stats": {k: v.to_dict() for k, v in stats.items()}}
    return summary, samples


class Recorder:
    """The ``instrument`` hook of ``verify_bundle``: keeps each batch's outputs (bundle, and reference
    when asked) and every timed call's duration."""

    def __init__(self, keep_reference: bool = False):
        self.keep_reference = keep_reference
        self.outputs: dict[str, list[dict[str, np.ndarray]]] = {"bundle": [], "reference": []}
        self.latency_s: dict[str, list[float]] = {}
        self.first_feeds: dict[str, np.ndarray] | None = None  # one sample of the data, for timing

    def __call__(self, role: str, fn: Callable) -> Callable:
        if role == "bundle" or (role == "reference" and self.keep_reference):
            sink = self.outputs[role]

            def run(feeds, _fn=fn, _role=role):
                if _role == "bundle" and self.first_feeds is None:
                    self.first_feeds = {k: np.ascontiguousarray(v[:1]) for k, v in feeds.items()}
                out = _fn(feeds)
                sink.append({k: np.asarray(v) for k, v in out.items()})
                return out
            return run
        if role.endswith(".latency"):
            import time

            samples = self.latency_s.setdefault(role[:-len(".latency")], [])

            def timed(_fn=fn):
                start = time.perf_counter()
                result = _fn()
                samples.append(time.perf_counter() - start)
                return result
            return timed
        return fn

    def latency_ms(self, iterations: int) -> dict[str, np.ndarray]:
        """The timed calls after warm-up, in milliseconds."""
        return {k: np.asarray(v[-iterations:]) * 1e3 for k, v in self.latency_s.items() if iterations}


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


def save_baseline(path, report: Mapping, manifest: Mapping, outputs: list[dict[str, np.ndarray]], *,
                  batch_size: int, golden: str = "float16", latency: Mapping | None = None) -> Path:
    """Write NAME.json (+ NAME.npz unless golden == "none") from a finished verification run.
    ``latency`` is the summary from ``measure_gate_latency`` (None: no latency recorded)."""
    path = _check_baseline_path(path, "--save-baseline")
    if golden not in GOLDEN_MODES:
        raise InputError(f"unknown golden mode {golden!r}", field="--golden", fix=f"use {', '.join(GOLDEN_MODES)}")
    if not outputs:
        raise InputError("the run produced no outputs to record", field="--data", fix="pass non-empty eval data")
    names = [o["name"] for o in manifest["outputs"]]
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
    from ..runtime.manifest import sha256_file
    return sha256_file(path)


# ----------------------------------------------------------------------------------------- loading

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


MAX_BASELINE_BYTES = 64 << 20


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number a baseline may hold")


# --------------------------------------------------------------------------------------- comparing

def compare_to_baseline(baseline: Baseline, report: Mapping, manifest: Mapping,
                        outputs: list[dict[str, np.ndarray]], tolerances: GateTolerances,
                        latency: Mapping | None = None) -> dict:
    """The gate's verdict: accuracy (outputs vs golden, task metric) and latency (``measure_gate_latency`` of
    this run, ratio vs the baseline's ratio)."""
    from .metrics import ParityAccumulator

    changes, same_host = check_context(baseline.context, bundle_context(manifest), baseline.path)
    doc = baseline.doc
    result: dict = {"file": str(baseline.path), "created": doc.get("created"), "tolerances": tolerances.to_dict(),
                    "changes": changes, "notes": [], "outputs": {}, "failures": []}
    fail = result["failures"]
    golden = baseline.golden()
    for name, entry in doc["outputs"].items():
        now_batches = [b[name] for b in outputs if name in b]
        if len(now_batches) != len(outputs) or not now_batches:
            fail.append(f"output {name}: missing from the bundle (the baseline has it)")
            result["outputs"][name] = {"passed": False, "missing": True}
            continue
        shapes = [list(b.shape) for b in now_batches]
        if shapes != entry["batch_shapes"]:
            fail.append(f"output {name}: shape {shapes[0]} vs baseline {entry['batch_shapes'][0]}")
            result["outputs"][name] = {"passed": False, "shape": shapes[0]}
            continue
        identical = _digest(now_batches) == entry["sha256"]
        res: dict = {"identical": identical}
        if golden is not None and name in golden:
            acc = ParityAccumulator(report.get("output_heads"))   # the verdict verify used (output_kinds)
            # Identical bytes: compare with themselves, so float16 storage rounding is not shown as error.
            for g, b in zip(now_batches if identical else golden[name], now_batches):
                acc.add({name: g.astype(b.dtype) if g.dtype.kind == "f" else g}, {name: b})
            res.update({k: v for k, v in acc.result()[name].to_dict().items() if k not in ("name", "samples")})
            fail_before = len(fail)
            _check_output(name, res, entry, tolerances, fail)
            res["passed"] = len(fail) == fail_before
        else:
            res.update(_compare_stats(name, entry, now_batches, identical, tolerances, fail))
        result["outputs"][name] = res
    extra = [o["name"] for o in manifest["outputs"] if o["name"] not in doc["outputs"]]
    if extra:
        result["notes"].append(f"outputs not in the baseline (not gated): {', '.join(extra)}")
    result["task"] = _compare_task(doc.get("task"), report.get("task"), tolerances, fail, result["notes"])
    result["latency"] = _compare_latency(doc.get("latency"), latency, same_host, tolerances, fail,
                                         result["notes"])
    result["passed"] = not fail
    return result


def _check_output(name: str, res: dict, entry: Mapping, tol: GateTolerances, fail: list[str]) -> None:
    if res.get("exact_match") is not None:
        if res["exact_match"] < tol.min_exact_match:
            fail.append(f"output {name}: exact match vs golden {res['exact_match']:.4f} < {tol.min_exact_match}")
        return
    if res.get("mean_cosine") is not None and res["mean_cosine"] < tol.min_cosine:
        fail.append(f"output {name}: mean cosine vs golden {res['mean_cosine']:.6f} < {tol.min_cosine}")
    if res.get("top1_agreement") is not None and res["top1_agreement"] < tol.min_top1_agreement:
        fail.append(f"output {name}: top-1 agreement vs golden {res['top1_agreement']:.4f} < "
                    f"{tol.min_top1_agreement}")
    scale = entry["stats"].get("abs_max", 0.0)
    limit = tol.max_abs_rel * scale + entry.get("golden_error", 0.0)
    res["max_abs_limit"] = limit
    if res.get("max_abs_error", 0.0) > limit:
        fail.append(f"output {name}: max abs error vs golden {res['max_abs_error']:.4g} > {limit:.4g} "
                    f"({tol.max_abs_rel:g} x max |golden| {scale:.4g})")


def _compare_stats(name: str, entry: Mapping, batches: list[np.ndarray], identical: bool, tol: GateTolerances,
                   fail: list[str]) -> dict:
    """Digest-only baselines: identical bytes pass; otherwise mean and spread must stay within
    max_abs_rel of the baseline's max |value| (a coarse check, said so in the report)."""
    now, base = _stats(batches), entry["stats"]
    res = {"stats": now, "golden": False}
    if identical or "mean" not in base:
        res["passed"] = identical or "mean" not in now
        if not res["passed"]:
            fail.append(f"output {name}: no finite values in the baseline to compare with")
        return res
    if "mean" not in now:
        fail.append(f"output {name}: no finite values (baseline mean {base['mean']:.4g})")
        res["passed"] = False
        return res
    limit = tol.max_abs_rel * max(base["abs_max"], 1e-12)
    bad = [f"{k} {now[k]:.4g} vs baseline {base[k]:.4g}" for k in ("mean", "std")
           if abs(now[k] - base[k]) > limit]
    if bad:
        fail.append(f"output {name}: statistics differ beyond {limit:.3g} ({'; '.join(bad)}); no golden arrays "
                    "were stored, record with --golden float16 for a sample-wise check")
    res["passed"] = not bad
    return res


def _compare_task(recorded: Mapping | None, now: Mapping | None, tol: GateTolerances, fail: list[str],
                  notes: list[str]) -> dict | None:
    if not recorded:
        return None
    if not now or "bundle" not in now:
        notes.append(f"task {recorded['metric']}: not measured in this run (labels or metric missing)")
        return None
    if now["metric"] != recorded["metric"] or list(now["outputs"]) != list(recorded["outputs"]):
        notes.append(f"task metric {now['metric']} differs from the baseline's {recorded['metric']}: not gated")
        return None
    drop = recorded["value"] - now["bundle"]
    res = {"metric": now["metric"], "baseline": recorded["value"], "now": now["bundle"], "drop": drop,
           "passed": drop <= tol.max_metric_drop}
    if not res["passed"]:
        fail.append(f"task {now['metric']}: {now['bundle']:.2f} vs baseline {recorded['value']:.2f} "
                    f"(drop {drop:.2f} > {tol.max_metric_drop} points)")
    return res


def _compare_latency(recorded: Mapping | None, now: Mapping | None, same_host: bool, tol: GateTolerances,
                     fail: list[str], notes: list[str]) -> dict | None:
    def skip(reason):
        notes.append(f"latency not gated: {reason}")
        return {"skipped": reason}

    if not recorded:
        return skip("the baseline has no latency (recorded with --iterations 0)")
    if not now:
        return skip("not measured in this run (--iterations 0)")
    if recorded.get("anchor", {}).get("name") != ANCHOR_NAME:
        return skip(f"the baseline's anchor {recorded.get('anchor')!r} is not this edgemm's {ANCHOR_NAME!r}")
    if not same_host and not tol.latency_any_host:
        return skip("the baseline was recorded on other hardware (pass --latency-any-host to gate anyway)")
    pct = recorded["percentile"]
    change = now["ratio"] / max(recorded["ratio"], 1e-12)
    res = {"statistic": f"p{pct}", "ratio": now["ratio"], "baseline_ratio": recorded["ratio"], "change": change,
           "tolerance": tol.latency_ratio, "bundle_ms": now[f"bundle_p{pct}_ms"],
           "baseline_bundle_ms": recorded[f"bundle_p{pct}_ms"], "passed": change <= tol.latency_ratio}
    if not res["passed"]:
        fail.append(f"latency: bundle/anchor p{pct} ratio {now['ratio']:.3g} vs baseline {recorded['ratio']:.3g} "
                    f"({change:.2f}x slower > {tol.latency_ratio}x tolerance)")
    elif change < 1 / tol.latency_ratio:
        notes.append(f"latency: {1 / change:.2f}x faster than the baseline; consider re-recording it")
    return res


# ------------------------------------------------------------------------------------- the gate run

@dataclass
class GateRun:
    report: dict                      # the verification report, with report["baseline"] when gated
    recorder: Recorder                # outputs and latency samples, for the HTML report
    iterations: int
    baseline: Baseline | None = None  # the baseline gated against, if any
    gate_latency_ms: dict = field(default_factory=dict)  # single-threaded bundle/anchor samples

    def latency_ms(self) -> dict[str, np.ndarray]:
        """Every timed call (ms) for plots: the run's (deployment threads) and the gate's (1 thread)."""
        out = self.recorder.latency_ms(self.iterations)
        out.update({f"{k} (gate, 1 thread)": v for k, v in self.gate_latency_ms.items()})
        return out


def run_gate(bundle, data, *, baseline=None, save: str | os.PathLike | None = None, reference: str | None = None,
             weights: str | None = None, trust_pickle: bool = False, metric: str | None = None,
             metric_outputs=None, batch_size: int | None = None, iterations: int = 50,
             overrides: dict | None = None, tolerances: dict | None = None, golden: str = "float16",
             write: bool = True, keep_reference: bool = False, trusted_keys=None,
             require_signature: bool | None = None) -> GateRun:
    """Verify ``bundle`` on ``data`` and, with ``baseline``, gate it against that baseline; with ``save``,
    record a new baseline from this run (only when the run passed). Raises InputError for a baseline
    from another context or other eval data; a failing gate is ``report["passed"] == False``."""
    from ..runtime.manifest import read_manifest
    from ..runtime.signing import REPORTS_KEPT_NOTE, is_signed
    from .verify import verify_bundle

    if baseline is not None and save is not None:
        raise InputError("--baseline and --save-baseline exclude each other", field="--save-baseline",
                         fix="gate against the old baseline first, then record the new one in a separate run")
    manifest = read_manifest(bundle)
    loaded = load_baseline(baseline) if baseline is not None else None
    if save is not None:
        check_baseline_outputs(save, {"BUNDLE": bundle, "--data": data, "--reference": reference,
                                      "--weights": weights})
        if golden not in GOLDEN_MODES:
            raise InputError(f"unknown golden mode {golden!r}", field="--golden", fix=f"use {', '.join(GOLDEN_MODES)}")
    tol = GateTolerances.for_precision(manifest["precision"], **(tolerances or {}))
    width = anchor_width(Path(bundle), manifest)
    if loaded is not None:
        check_context(loaded.context, bundle_context(manifest), loaded.path)  # refuse early, before the work
        if batch_size is not None and batch_size != loaded.batch_size:
            raise InputError(f"batch size {batch_size} differs from the baseline's {loaded.batch_size} (outputs "
                             "such as [B, B] similarity logits depend on it)", field="--batch-size",
                             fix=f"drop --batch-size or pass {loaded.batch_size}")
        batch_size = loaded.batch_size
        # The same anchor work as at recording time, whatever the bundle's size is now.
        width = int(((loaded.doc.get("latency") or {}).get("anchor") or {}).get("width") or width)
    if not batch_size:
        from ..iospec import TensorSpec, call_batch

        batch_size = call_batch([TensorSpec.from_dict(d) for d in manifest["inputs"]])
    recorder = Recorder(keep_reference=keep_reference)
    gated = loaded is not None or save is not None
    report = verify_bundle(bundle, data, reference=reference, weights=weights, trust_pickle=trust_pickle,
                           metric=metric, metric_outputs=metric_outputs, batch_size=batch_size,
                           iterations=iterations, write=False, overrides=overrides, instrument=recorder,
                           trusted_keys=trusted_keys, require_signature=require_signature)
    outputs = recorder.outputs["bundle"]
    latency, gate_samples = None, {}
    if gated and iterations and recorder.first_feeds is not None:
        latency, gate_samples = measure_gate_latency(bundle, manifest, recorder.first_feeds, width, iterations,
                                                     trusted_keys=trusted_keys, require_signature=require_signature)
    if loaded is not None:
        recorded_sha = loaded.doc["data"].get("sha256")
        if recorded_sha and recorded_sha != report["data"]["sha256"]:
            raise InputError(f"eval data differs from the baseline's ({loaded.doc['data'].get('path')}, sha256 "
                             f"{recorded_sha[:12]}...)", file=data, field="--data",
                             fix="gate on the same eval file the baseline was recorded with")
        gate = compare_to_baseline(loaded, report, manifest, outputs, tol, latency)
        report["baseline"] = gate
        report["failures"] = list(report["failures"]) + [f"baseline: {f}" for f in gate["failures"]]
        report["passed"] = not report["failures"]
    if save is not None:
        if report["passed"]:
            save_baseline(save, report, manifest, outputs, batch_size=batch_size, golden=golden, latency=latency)
            report["baseline_saved"] = str(save)
        else:
            report["baseline_saved"] = None
            report.setdefault("notes", []).append("baseline not saved: this run fails verification")
    if write and is_signed(bundle):
        report.setdefault("notes", []).append(REPORTS_KEPT_NOTE)
    elif write:
        write_reports(Path(bundle), report)
    return GateRun(report, recorder, iterations, loaded, gate_samples)


def write_reports(bundle_dir: Path, report: dict) -> None:
    """report.json and report.md in the bundle (both unhashed), with the gate's section."""
    from .report import render_markdown, write_bundle_reports

    text = render_markdown(report)
    if report.get("baseline"):
        text += "\n" + render_gate_markdown(report)
    write_bundle_reports(bundle_dir, [("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", text)])


# ------------------------------------------------------------------------------------------ markdown

def render_gate_markdown(report: Mapping) -> str:
    """The baseline section: outputs vs golden, task metric, latency ratio, context changes."""
    gate = report.get("baseline")
    if not gate:
        return ""
    lines = [f"## Baseline gate: {'PASS' if gate['passed'] else 'FAIL'}", "",
             f"Against `{md_code(gate['file'])}` (recorded {md_text(gate.get('created'))}).", "",
             "| output | vs golden | mean cosine | max abs err (limit) | top-1 / exact | pass |",
             "|---|---|---|---|---|---|"]
    for name, o in gate["outputs"].items():
        how = "missing" if o.get("missing") else ("identical" if o.get("identical") else
                                                  ("stats only" if o.get("golden") is False else "changed"))
        cos = f"{o['mean_cosine']:.6f}" if o.get("mean_cosine") is not None else "–"
        mae = (f"{o['max_abs_error']:.4g} ({o['max_abs_limit']:.3g})" if "max_abs_limit" in o else "–")
        agree = o.get("top1_agreement", o.get("exact_match"))
        lines.append(f"| {md_text(name)} | {how} | {cos} | {mae} | {'–' if agree is None else f'{agree:.4f}'} | "
                     f"{'yes' if o.get('passed') else '**NO**'} |")
    task = gate.get("task")
    if task:
        lines += ["", f"Task **{md_text(task['metric'])}**: {task['now']:.2f} (baseline {task['baseline']:.2f}, "
                      f"drop {task['drop']:.2f} points) {'ok' if task['passed'] else '**FAIL**'}"]
    lat = gate.get("latency") or {}
    if "change" in lat:
        lines += ["", f"Latency: bundle/anchor {lat['statistic']} ratio {lat['ratio']:.3g} vs baseline "
                      f"{lat['baseline_ratio']:.3g} → **{lat['change']:.2f}x** (tolerance {lat['tolerance']}x) "
                      f"{'ok' if lat['passed'] else '**FAIL**'}; bundle {lat['statistic']} {lat['bundle_ms']:.3f} ms "
                      f"(baseline {lat['baseline_bundle_ms']:.3f} ms, on its own machine)"]

    if gate["failures"]:
        lines += ["", "Failures:", *[f"- {md_text(f)}" for f in gate["failures"]]]
    for title, items in (("Notes", gate.get("notes")), ("Changed since the baseline", gate.get("changes"))):
        if items:
            lines += ["", f"{title}:", *[f"- {md_text(i)}" for i in items]]
    return "\n".join(lines) + "\n"


def render_pr_summary(report: Mapping) -> str:
    """A short Markdown summary for a pull-request comment: verdict first, details folded."""
    from .report import render_markdown

    meta = report.get("bundle") or {}
    ok = report.get("passed")
    head = (f"### {'✅' if ok else '❌'} edgemm gate {'passed' if ok else 'FAILED'}: `{md_code(meta.get('name'))}` "
            f"({md_text(meta.get('precision'))}, {md_text(meta.get('backend'))}, target {md_text(meta.get('target'))})")
    lines = [head, ""]
    if report.get("failures"):
        lines += [*[f"- {md_text(f)}" for f in report["failures"]], ""]
    gate = report.get("baseline")
    if gate:
        lat = gate.get("latency") or {}
        bits = [f"{sum(1 for o in gate['outputs'].values() if o.get('passed'))}/{len(gate['outputs'])} outputs "
                "within tolerance of the baseline"]
        if gate.get("task"):
            t = gate["task"]
            bits.append(f"{md_text(t['metric'])} {t['now']:.2f} (baseline {t['baseline']:.2f})")
        if "change" in lat:
            bits.append(f"latency {lat['change']:.2f}x the baseline ratio (tolerance {lat['tolerance']}x)")
        elif lat.get("skipped"):
            bits.append(f"latency not gated ({lat['skipped']})")
        lines += ["; ".join(bits) + ".", ""]
    if report.get("baseline_saved"):
        lines += [f"Baseline recorded: `{md_code(report['baseline_saved'])}`.", ""]
    details = render_markdown(report) + ("\n" + render_gate_markdown(report) if gate else "")
    lines += ["<details><summary>Full report</summary>", "", details, "</details>"]
    return "\n".join(lines) + "\n"
