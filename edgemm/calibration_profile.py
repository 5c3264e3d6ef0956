"""The calibration profile: a compact summary of the data a bundle was calibrated on, recorded in the
manifest (``calibration_profile``) so that the runtime can tell when its inputs drift away from it
(edgemm/runtime/monitor.py, ``edgemm monitor``).

Per input: value count, min/max, mean/std, a few percentiles, the fraction of zeros (padding, for token
ids with pad id 0 and for masks), NaN/Inf count (always 0: calibration data with NaN/Inf is refused when
it is loaded, edgemm.data), and for token ids the embedding table's size (read from the FP32 graph), how
many distinct ids the calibration used and which fraction of the table that covers. Per output of the
FP32 model on the same samples: the same figures (min/max over finite values, the NaN/Inf count).

For INT8 the [min, max] is the one that matters: a static INT8 recipe maps the calibrated range onto 256
levels, and values beyond it saturate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROFILE_VERSION = 1
PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
PERCENTILE_SAMPLE = 1 << 20    # values the percentiles are read from (a strided subsample of larger arrays)
OUTPUT_SAMPLES = 256           # calibration samples run through the FP32 model for the output profile


def _number(v) -> float | int:
    """JSON-friendly: ints stay ints, floats are rounded to 7 significant digits (float32 precision)."""
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return int(v)
    return float(f"{float(v):.7g}")


def _exact(v) -> float | int:
    return int(v) if isinstance(v, (np.integer, np.bool_)) else float(v)


def _summary(x: np.ndarray) -> dict:
    """min/max/mean/std/percentiles/zero fraction of the finite values of ``x``, and its NaN/Inf count."""
    flat = x.reshape(-1)
    if flat.dtype == np.bool_:
        flat = flat.astype(np.uint8)
    nonfinite = 0
    if flat.dtype.kind == "f":
        finite = np.isfinite(flat)
        nonfinite = int(flat.size - np.count_nonzero(finite))
        if nonfinite:
            flat = flat[finite]
    out = {"values": int(x.size), "nonfinite": nonfinite}
    if not flat.size:
        return out
    step = max(1, flat.size // PERCENTILE_SAMPLE)
    sample = flat[::step].astype(np.float64)
    out.update({
        # exact, not rounded: the runtime counts values beyond them, and the calibration's own extremes are in
        "min": _exact(flat.min()), "max": _exact(flat.max()),
        "mean": _number(sample.mean()), "std": _number(sample.std()),
        "percentiles": {f"p{p:g}": _number(v) for p, v in zip(PERCENTILES, np.percentile(sample, PERCENTILES))},
        "zero_fraction": _number(1.0 - np.count_nonzero(flat) / flat.size),
    })
    return out


def profile_inputs(arrays: dict[str, np.ndarray], vocab: dict[str, int]) -> dict:
    """``vocab``: input -> rows of the embedding table it indexes (onnx_graph.embedding_sizes)."""
    from .modality import is_mask

    profiles = {}
    for name, x in arrays.items():
        entry = {"dtype": str(x.dtype)}
        entry.update(_summary(x))
        if x.dtype.kind in "iu" and x.size:
            rows = vocab.get(name)
            entry["kind"] = "tokens" if rows else ("mask" if is_mask(name, str(x.dtype)) else "integer")
            ids = np.unique(x)
            entry["distinct"] = int(ids.size)
            if rows:
                entry["vocab_size"] = int(rows)
                entry["vocab_coverage"] = _number(np.count_nonzero((ids >= 0) & (ids < rows)) / rows)
        elif x.dtype == np.bool_:
            entry["kind"] = "mask"
        else:
            entry["kind"] = "float"
        profiles[name] = entry
    return profiles


def output_sample_count(available: int, batch: int, static: bool) -> int:
    """Samples the output profile runs: at most OUTPUT_SAMPLES, whole batches for a static-batch model."""
    n = min(OUTPUT_SAMPLES, available)
    return n - n % batch if static and n >= batch else n


def profile_outputs(onnx_path: Path, arrays: dict[str, np.ndarray], batch: int, n: int) -> dict:
    """The FP32 model's outputs on the first ``n`` calibration samples, ``batch`` per call."""
    from .onnx_io import cpu_session

    sess = cpu_session(onnx_path, spinning=False)
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list] = {name: [] for name in names}
    for start in range(0, n, batch):
        feeds = {k: v[start:min(start + batch, n)] for k, v in arrays.items()}
        for name, value in zip(names, sess.run(names, feeds)):
            parts[name].append(np.asarray(value))
    out = {}
    for name, chunks in parts.items():
        try:
            joined = np.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]
        except ValueError:  # an output spanning each call's batch ([batch, batch]): its values all the same
            joined = np.concatenate([c.reshape(-1) for c in chunks])
        out[name] = {"dtype": str(joined.dtype), **_summary(joined)}
    return out


def build_profile(fp32_onnx: Path, arrays: dict[str, np.ndarray], batch: int, *, static_batch: bool = False) -> dict:
    """The manifest's ``calibration_profile`` for the calibration ``arrays`` (input name -> samples);
    ``batch``: samples per call of the FP32 model (its fixed batch when ``static_batch``)."""
    from .onnx_graph import embedding_sizes
    from .onnx_io import load_graph

    vocab = embedding_sizes(load_graph(fp32_onnx))
    profile = {"version": PROFILE_VERSION, "samples": int(next(iter(arrays.values())).shape[0]),
               "inputs": profile_inputs(arrays, vocab)}
    n_out = output_sample_count(profile["samples"], batch, static_batch)
    try:
        profile["outputs"] = profile_outputs(fp32_onnx, arrays, batch, n_out)
        profile["output_samples"] = n_out
    except Exception as exc:  # the input profile (what drift is judged on) stands without it
        profile["outputs"] = None
        profile["note"] = f"outputs not profiled: the FP32 model did not run ({type(exc).__name__}: {str(exc)[:160]})"
    return profile
