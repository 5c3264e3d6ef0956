"""On-device monitoring: latency, errors and calibration drift, measured by the runtime itself.

``edgemm.runtime.load(path, monitor=True)`` returns a ``MonitoredBundle``; a plain ``load`` returns the
plain ``Bundle``, whose ``run`` has no monitoring code in it at all (zero cost when off).

Per call the monitor does, outside its lock: two timestamps, and per input a ``min`` and a ``max``
(numpy reductions). Only when those fall outside the calibrated range (or are NaN) does it count the
offending values exactly. Inside the lock it adds a few integers. Latency goes into a fixed histogram of
log-spaced buckets (bounded memory, whatever the number of calls).

``stats()`` (a dict, stable: the Triton backend and ``edgemm monitor`` read it)::

    {"bundle", "calls", "errors",                 # errors: calls that raised (refused inputs included)
     "batch_sizes": {size: calls},                # axis 0 of the batch input; bounded by the manifest's range
     "latency_ms": {"p50", "p90", "p99", "mean", "max", "count"},   # successful calls; None before any
     "drift": "known" | "unknown (...)",          # known: the bundle carries a calibration profile
     "max_out_of_range", "window", "drift_windows", "callback_errors",
     "inputs": {name: {"values", "nonfinite",
                       "out_of_range", "out_of_range_fraction", "range",              # None without a range
                       "unknown_tokens", "unknown_token_fraction", "vocab_size"}}}    # None unless token ids

Fractions are of values (elements), since the last reset. Data that drifts costs more per call: the
exact counts then take a pass or two over the input.

Standard library + numpy only (runs on devices).
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..errors import InputError

__all__ = ["Monitor", "LatencyHistogram", "InputProbe", "probes_from_profile", "probes_from_entries"]

log = logging.getLogger(__name__)

NO_PROFILE = ("unknown (the bundle has no calibration_profile: compiled without --calib or by an older edgemm; "
              "recompile with --calib to record one)")
DEFAULT_WINDOW = 1000          # calls per drift window
DEFAULT_MAX_OUT_OF_RANGE = 0.01


_LOW_MS, _PER_DECADE, _DECADES = 1e-3, 40, 9
_BOUNDS_MS = tuple(_LOW_MS * 10 ** ((i + 1) / _PER_DECADE) for i in range(_PER_DECADE * _DECADES))


class LatencyHistogram:
    """Fixed log-spaced buckets from 1 µs to 1000 s, 40 per decade (a bucket is 6% wide, so a percentile
    read from it is within 3% of the exact one). Not thread-safe by itself: the Monitor's lock guards it."""

    LOW_MS = _LOW_MS
    PER_DECADE = _PER_DECADE
    BOUNDS_MS = _BOUNDS_MS  # upper bounds in ms; one overflow bucket beyond the last

    def __init__(self):
        self.counts = [0] * (len(self.BOUNDS_MS) + 1)
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS_MS, ms)] += 1
        self.count += 1
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms

    def quantile(self, q: float) -> float | None:
        """The q-quantile in ms: the geometric middle of the bucket holding it (clamped to the max seen)."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if n and seen >= rank:
                if i >= len(self.BOUNDS_MS):
                    return self.max_ms
                upper = self.BOUNDS_MS[i]
                lower = self.BOUNDS_MS[i - 1] if i else upper / 10 ** (1 / self.PER_DECADE)
                return min(math.sqrt(lower * upper), self.max_ms)
        return self.max_ms

    def cumulative(self, every: int) -> list[tuple[float, int]]:
        """(upper bound in seconds, calls at or below it) at every ``every``-th bucket bound (Prometheus)."""
        out, seen = [], 0
        for i, n in enumerate(self.counts[:-1]):
            seen += n
            if (i + 1) % every == 0:
                out.append((self.BOUNDS_MS[i] / 1000.0, seen))
        return out


@dataclass(frozen=True)
class InputProbe:
    """What the monitor checks one input against: the calibrated [low, high] and, for token ids, the
    embedding table's size (ids outside [0, vocab_size) index no row)."""
    name: str
    low: float | None = None
    high: float | None = None
    vocab_size: int | None = None

    @property
    def has_range(self) -> bool:
        return self.low is not None and self.high is not None

    def measure(self, x: np.ndarray) -> tuple[int, int, int, int]:
        """(values, out of range, non-finite, unknown tokens) of one array. The common case (everything
        in range) costs one min and one max; exact counts only when those say something is out."""
        n = x.size
        if not n:
            return 0, 0, 0, 0
        kind = x.dtype.kind
        if kind not in "fiub":
            return n, 0, 0, 0
        lo, hi = x.min(), x.max()
        out = nonfinite = unknown = 0
        if kind == "f" and not (math.isfinite(lo) and math.isfinite(hi)):
            nonfinite = n - int(np.count_nonzero(np.isfinite(x)))
        if self.has_range and not (lo >= self.low and hi <= self.high):  # NaN fails both comparisons
            out = n - int(np.count_nonzero((x >= self.low) & (x <= self.high)))
        if self.vocab_size is not None and kind in "iu" and (lo < 0 or hi >= self.vocab_size):
            unknown = n - int(np.count_nonzero((x >= 0) & (x < self.vocab_size)))
        return n, out, nonfinite, unknown


def probes_from_profile(input_names, profile) -> tuple[list[InputProbe], bool]:
    """One probe per input from a CalibrationProfile (edgemm.runtime.calibration_section), or None;
    (probes, whether a profile exists)."""
    return probes_from_entries(input_names, profile.inputs if profile is not None else None)


def probes_from_entries(names, entries) -> tuple[list[InputProbe], bool]:
    """Probes from a profile's ``inputs`` (or ``outputs``): name -> TensorProfile; (probes, whether the map
    exists). A name the profile lacks gets a probe that only counts values and NaN/Inf."""
    if entries is None:
        return [InputProbe(name) for name in names], False
    probes = []
    for name in names:
        t = entries.get(name)
        if t is None:
            probes.append(InputProbe(name))
            continue
        low, high = t.low, t.high
        if t.kind == "mask" and t.has_range:
            # 0 and 1 are always valid in a mask: calibration without padding (all ones) is fine (compile
            # forces padding into 0/1 inputs when it probes ranges), so padding at run time is no drift
            low, high = min(low, 0.0), max(high, 1.0)
        probes.append(InputProbe(name, low, high, t.vocab_size))
    return probes, True


def check_options(*, on_drift=None, max_out_of_range=DEFAULT_MAX_OUT_OF_RANGE, window=DEFAULT_WINDOW) -> None:
    """Refuse bad monitoring options in one line (load() calls it before opening a session)."""
    if isinstance(max_out_of_range, bool) or not isinstance(max_out_of_range, (int, float)) \
            or not 0 <= max_out_of_range <= 1:
        raise InputError(f"must be a fraction in [0, 1], got {max_out_of_range!r}", field="max_out_of_range",
                         fix="e.g. max_out_of_range=0.01 (1% of values outside the calibrated range)")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InputError(f"must be a whole number of calls >= 1, got {window!r}", field="window",
                         fix="e.g. window=1000")
    if on_drift is not None and not callable(on_drift):
        raise InputError(f"must be callable, got {type(on_drift).__name__}", field="on_drift",
                         fix="pass a function taking one dict")


class _Counts:
    __slots__ = ("values", "out", "nonfinite", "unknown")

    def __init__(self):
        self.values = self.out = self.nonfinite = self.unknown = 0

    def add(self, m) -> None:
        self.values += m[0]
        self.out += m[1]
        self.nonfinite += m[2]
        self.unknown += m[3]


class Monitor:
    """Counters of one bundle's calls. ``observe`` measures the inputs of a call (outside the lock),
    ``record`` adds a finished call; both are cheap. Thread-safe: one lock, held only to add integers."""

    def __init__(self, input_names, profile=None, *, bundle_name: str = "",
                 on_drift: Callable[[dict], object] | None = None,
                 max_out_of_range: float = DEFAULT_MAX_OUT_OF_RANGE, window: int = DEFAULT_WINDOW):
        check_options(on_drift=on_drift, max_out_of_range=max_out_of_range, window=window)
        self.bundle_name = bundle_name
        self.probes, self.profiled = probes_from_profile(list(input_names), profile)
        self.on_drift = on_drift
        self.max_out_of_range = float(max_out_of_range)
        self.window = window
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = 0
            self.errors = 0
            self.batch_sizes: dict[int, int] = {}
            self.latency = LatencyHistogram()
            self.totals = {p.name: _Counts() for p in self.probes}
            self.drift_windows = 0
            self.callback_errors = 0
            self._window_calls = 0
            self._window = {p.name: _Counts() for p in self.probes}

    def observe(self, feeds: Mapping) -> list:
        """Per input (in the bundle's order): its measures, or None where the feed is not an array (the
        run will refuse it)."""
        out = []
        for probe in self.probes:
            x = feeds.get(probe.name) if isinstance(feeds, Mapping) else None
            out.append(probe.measure(x) if isinstance(x, np.ndarray) else None)
        return out

    def record(self, measures: list, batch: int | None, ms: float | None) -> None:
        """Add one call: ``ms`` None when it failed."""
        event = None
        with self._lock:
            self.calls += 1
            if ms is None:
                self.errors += 1
            else:
                self.latency.add(ms)
            if batch is not None:
                self.batch_sizes[batch] = self.batch_sizes.get(batch, 0) + 1
            for probe, m in zip(self.probes, measures):
                if m is not None:
                    self.totals[probe.name].add(m)
                    self._window[probe.name].add(m)
            self._window_calls += 1
            if self._window_calls >= self.window:
                event = self._close_window()
        if event is not None and self.on_drift is not None:
            try:  # outside the lock: the callback may call stats()
                self.on_drift(event)
            except Exception as exc:  # a failing alert hook must not fail inference
                with self._lock:
                    self.callback_errors += 1
                log.warning("edgemm monitor: on_drift callback raised %s: %s", type(exc).__name__, exc)

    def _close_window(self) -> dict | None:
        """At the end of each window (under the lock): the inputs past the bound, or None; the window's
        counts start again."""
        drifted = {}
        for probe in self.probes:
            c = self._window[probe.name]
            figures = _figures(probe, c)
            oor, unk = figures["out_of_range_fraction"], figures["unknown_token_fraction"]
            if (oor is not None and oor > self.max_out_of_range) or (unk is not None and unk > self.max_out_of_range) \
                    or c.nonfinite:
                drifted[probe.name] = figures
        calls = self._window_calls
        self._window_calls = 0
        self._window = {p.name: _Counts() for p in self.probes}
        if not drifted:
            return None
        self.drift_windows += 1
        return {"bundle": self.bundle_name, "window_calls": calls, "window_index": self.drift_windows,
                "max_out_of_range": self.max_out_of_range, "inputs": drifted}

    def stats(self) -> dict:
        with self._lock:
            lat = self.latency
            return {
                "bundle": self.bundle_name,
                "calls": self.calls,
                "errors": self.errors,
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "latency_ms": {"p50": lat.quantile(0.5), "p90": lat.quantile(0.9), "p99": lat.quantile(0.99),
                               "mean": lat.sum_ms / lat.count if lat.count else None,
                               "max": lat.max_ms if lat.count else None, "count": lat.count},
                "drift": "known" if self.profiled else NO_PROFILE,
                "max_out_of_range": self.max_out_of_range,
                "window": self.window,
                "drift_windows": self.drift_windows,
                "callback_errors": self.callback_errors,
                "inputs": {p.name: _figures(p, self.totals[p.name]) for p in self.probes},
            }

    def latency_histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """(cumulative (le seconds, count), count, sum seconds) for the Prometheus histogram."""
        with self._lock:
            return (self.latency.cumulative(LatencyHistogram.PER_DECADE // 4), self.latency.count,
                    self.latency.sum_ms / 1000.0)


def _figures(probe: InputProbe, c: _Counts) -> dict:
    return {
        "values": c.values,
        "out_of_range": c.out if probe.has_range else None,
        "out_of_range_fraction": (c.out / c.values if c.values else 0.0) if probe.has_range else None,
        "nonfinite": c.nonfinite,
        "unknown_tokens": c.unknown if probe.vocab_size is not None else None,
        "unknown_token_fraction": ((c.unknown / c.values if c.values else 0.0)
                                   if probe.vocab_size is not None else None),
        "range": [probe.low, probe.high] if probe.has_range else None,
        "vocab_size": probe.vocab_size,
    }


def timed_run(monitor: Monitor, run, feeds, batch_input: str | None):
    """Run ``run(feeds)`` under the monitor: measures the inputs first (a NaN or an unknown token is
    counted even when the run then refuses the call), counts the call, its batch and its latency."""
    measures = monitor.observe(feeds)
    batch = None
    x = feeds.get(batch_input) if batch_input is not None and isinstance(feeds, Mapping) else None
    if isinstance(x, np.ndarray) and x.ndim:
        batch = int(x.shape[0])
    start = time.perf_counter()
    try:
        result = run(feeds)
    except BaseException:
        monitor.record(measures, batch, None)
        raise
    monitor.record(measures, batch, (time.perf_counter() - start) * 1000.0)
    return result
