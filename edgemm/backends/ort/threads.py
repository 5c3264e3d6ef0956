"""Intra-op thread count for a CPU bundle, chosen by measurement at compile time (as Olive's session
parameter tuning does).

Why: ORT splits every op over all cores by default. For small edge models most of a call is per-op
dispatch, and the split costs more than it saves: the dual-encoder zoo model ran 0.12 ms single-threaded
and 0.25 ms on ORT's default two threads here, while the MiniLM-sized model wants both cores. Only the
single-thread setting is ever recorded: it does not depend on how many cores the device has, whereas
"N threads" measured here would not carry over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# One thread is recorded only when it beats ORT's default by this margin: a near-tie is noise, and the
# default scales with bigger inputs.
MIN_GAIN = 0.10
ITERATIONS = 30
BUDGET_S = 5.0


def tune_intra_op_threads(model_path: Path, feeds: Mapping[str, np.ndarray], *,
                          disabled_optimizers: Sequence[str] = ()) -> dict:
    """{"intra_op_threads": 1 or 0 (ORT default), "p50_ms": {"default": ..., "1": ...}, "batch": n}."""
    import os

    from ...parity.latency import measure_interleaved_within
    from ...onnx_io import cpu_session

    if (os.cpu_count() or 1) < 2:
        return {"intra_op_threads": 0, "note": "one CPU core: nothing to choose"}
    sessions = {label: cpu_session(model_path, spinning=False, disabled_optimizers=disabled_optimizers,
                                   intra_op_threads=threads) for label, threads in (("default", 0), ("1", 1))}
    feeds = dict(feeds)
    stats = measure_interleaved_within({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                                       budget_s=BUDGET_S, max_iterations=ITERATIONS)
    iterations = stats["default"].iterations
    p50 = {k: round(v.p50_ms, 4) for k, v in stats.items()}
    single = p50["1"] <= (1 - MIN_GAIN) * p50["default"]
    return {"intra_op_threads": 1 if single else 0, "p50_ms": p50, "iterations": iterations,
            "batch": int(next(iter(feeds.values())).shape[0]) if feeds else 0}
