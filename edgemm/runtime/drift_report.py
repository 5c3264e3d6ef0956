"""Is this data still what the bundle was calibrated for? Runs a dataset through a monitored bundle and
judges each input's figures against the manifest's calibration_profile (``edgemm monitor``).

Torch-free (numpy + the runtime), like the monitor itself.
"""

from __future__ import annotations

import numpy as np

from ..errors import first_line
from .monitor import Monitor, probes_from_entries

MAX_ERRORS_SHOWN = 3


def drift_report(bundle, dataset, *, batch_size: int) -> dict:
    """``bundle``: a MonitoredBundle (its counters are reset first); ``dataset``: edgemm.data.Dataset.

    The verdict: ``passed`` is False when an input's out-of-range or unknown-token fraction is above the
    bundle's ``max_out_of_range``, any input value is NaN/Inf, or any call failed. Calls the runtime
    refuses are counted as errors and the run goes on (their inputs are counted all the same). Outputs are compared with
    the FP32 model's outputs on the calibration data, for information (not judged: a quantized model's
    outputs may differ from FP32 within its parity bars)."""
    bundle.reset_stats()
    monitor: Monitor = bundle.monitor
    profile = bundle.calibration_profile
    out_entries = profile.outputs if profile is not None else None
    output_names = [o.name for o in bundle.outputs]
    out_probes, out_known = probes_from_entries(output_names, out_entries)
    out_counts = {p.name: [0, 0, 0] for p in out_probes}
    errors: list[str] = []
    sizes: dict[int, int] = {}   # calls per batch size, as sent (the last batch may be smaller)
    calls = failed = 0
    for batch in dataset.batches(batch_size):
        size = len(next(iter(batch.values())))
        sizes[size] = sizes.get(size, 0) + 1
        calls += 1
        try:
            outputs = bundle.run(batch)
        except Exception as exc:  # counted by the monitor; the rest of the data still runs
            failed += 1
            line = first_line(exc, limit=200, default=type(exc).__name__)
            if line not in errors and len(errors) < MAX_ERRORS_SHOWN:
                errors.append(line)
            continue
        for probe in out_probes:
            value = outputs.get(probe.name)
            if isinstance(value, np.ndarray):
                n, out, nonfinite, _ = probe.measure(value)
                counts = out_counts[probe.name]
                counts[0] += n
                counts[1] += out
                counts[2] += nonfinite
    stats = bundle.stats()
    bound = stats["max_out_of_range"]
    failures = []
    for name, f in stats["inputs"].items():
        for key, what in (("out_of_range_fraction", "values outside the calibrated range"),
                          ("unknown_token_fraction", "token ids outside the embedding table")):
            if f[key] is not None and f[key] > bound:
                failures.append(f"{name}: {f[key]:.2%} {what} (bound {bound:.2%})")
        if f["nonfinite"]:
            failures.append(f"{name}: {f['nonfinite']} NaN/Inf value(s)")
    for name, f in stats["inputs"].items():
        array = dataset.arrays[name]
        finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
        f["data_range"] = [_plain(finite.min()), _plain(finite.max())] if finite.size else None
    outputs = {}
    for probe in out_probes:   # no output measured (every call refused): a fraction of nothing is unknown
        n, out, nonfinite = out_counts[probe.name]
        outputs[probe.name] = {"values": n, "out_of_range_fraction": (out / n if n else None) if probe.has_range
                               else None, "nonfinite": nonfinite,
                               "range": [probe.low, probe.high] if probe.has_range else None}
    return {"bundle": str(bundle.path), "samples": dataset.num_samples, "batch_size": batch_size, "batch_sizes": sizes,
            "drift": stats["drift"], "max_out_of_range": bound, "failed_calls": failed, "calls": calls,
            # a call the bundle refused checked nothing: the data cannot pass
            "passed": not failures and not failed, "failures": failures,
            "errors_seen": errors, "stats": stats, "outputs": outputs if out_known else None}


def _plain(v):
    return int(v) if isinstance(v, (np.integer, np.bool_)) else float(v)
