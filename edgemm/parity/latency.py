"""Latency measurement that survives a noisy machine.

Candidates are timed *interleaved* (round-robin, one call each per round) after
warm-up, so that load spikes hit all of them alike; figures that matter are
reported as ratios between candidates measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int

    @classmethod
    def from_samples(cls, seconds: list[float]) -> "LatencyStats":
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), len(seconds))

    def to_dict(self) -> dict:
        return asdict(self)


def measure_interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int = 5,
                        iterations: int = 50) -> dict[str, LatencyStats]:
    """Time each zero-argument callable ``iterations`` times, round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iterations):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: LatencyStats.from_samples(s) for name, s in samples.items()}


def measure(fn: Callable[[], object], *, warmup: int = 5, iterations: int = 50) -> LatencyStats:
    return measure_interleaved({"fn": fn}, warmup=warmup, iterations=iterations)["fn"]


def measure_interleaved_within(fns: Mapping[str, Callable[[], object]], *, budget_s: float, max_iterations: int,
                               min_iterations: int = 5, warmup: int = 3) -> dict[str, LatencyStats]:
    """measure_interleaved with as many rounds as fit in ``budget_s`` (one timed round first sizes it),
    clamped to [min_iterations, max_iterations]: small models get many samples, big ones stay bounded."""
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    per_round = time.perf_counter() - start
    iterations = int(max(min_iterations, min(max_iterations, budget_s / max(per_round, 1e-6))))
    return measure_interleaved(fns, warmup=warmup, iterations=iterations)

