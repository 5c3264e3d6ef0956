"""Triton python-backend model serving one edgemm bundle with ``edgemm.runtime``.

`edgemm export triton` copies this file unchanged to ``<repository>/<model>/<version>/model.py``; the
bundle sits beside it in ``bundle/``. At load the runtime checks every file's sha256 (and the signature,
with trusted keys from ``EDGEMM_TRUSTED_KEYS`` in the server's environment; config parameter
``edgemm.require_signature`` makes one mandatory; ``edgemm.monitor`` publishes the runtime monitor's
input checks as Triton metrics): a bundle changed after export is refused and the model
is not ready. ``execute`` runs the requests Triton's dynamic batcher hands over as few bundle calls as
their shapes allow, and splits the outputs back per request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's python backend stub

BUNDLE_FOLDER = "bundle"


class TritonPythonModel:
    def initialize(self, args):
        import edgemm.runtime as rt

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        require = params.get("edgemm.require_signature") == "true"
        bundle_dir = Path(args["model_repository"]) / args["model_version"] / BUNDLE_FOLDER
        # A split bundle's part (one step of a Triton ensemble): the whole bundle is copied and verified
        # (its hashes and signature cover every part), and this model runs only its part.
        part = params.get("edgemm.part")
        monitor = params.get("edgemm.monitor") == "true"
        # require_signature None: the runtime's default (a signature is required whenever a key is trusted)
        self.bundle = rt.load(bundle_dir, require_signature=True if require else None, monitor=monitor and not part)
        self.runner = self.bundle.part(part) if part else self.bundle
        self.stats = self.bundle.stats if monitor and not part else None
        if monitor and part:   # a part reading the model's inputs checks those it reads (export asks no other)
            self.runner = MonitoredPart(self.runner, self.bundle)
            self.stats = self.runner.monitor.stats
        self.drift = None
        if self.stats is not None:
            watched = self.runner.monitored_inputs if part else [s.name for s in self.bundle.inputs]
            self.drift = DriftMetrics(args["model_name"], args["model_version"], watched)
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.input_names = [s.name for s in self.runner.inputs]

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds = {}
        for i, request in enumerate(requests):
            try:
                feeds[i] = {name: _array(pb_utils.get_input_tensor_by_name(request, name))
                            for name in self.input_names}
            except Exception as exc:  # a missing input: this request fails, the others run
                responses[i] = _error(f"bad request: {exc}")
        groups = self._groups(feeds) if self.batched else [[i] for i in feeds]
        for members in groups:
            try:
                outs = self._run([feeds[i] for i in members])
            except Exception as exc:
                if len(members) > 1:  # one client's bad input must not fail the others merged with it
                    groups.extend([i] for i in members)
                    continue
                responses[members[0]] = _error(str(exc))  # edgemm's one-line error (NaN, range, ...)
                continue
            for i, out in zip(members, outs):
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[_tensor(name, value) for name, value in out.items()])
        if self.drift is not None:
            self.drift.publish(self.stats())
        return responses

    def _groups(self, feeds: dict) -> list[list[int]]:
        """Requests whose inputs agree on every axis but the batch run as one call (a sequence length
        may differ between requests)."""
        groups: dict = {}
        for i, request in feeds.items():
            key = tuple((name, request[name].shape[1:], request[name].dtype.str) for name in self.input_names)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run(self, requests: list[dict]) -> list[dict]:
        if len(requests) == 1:
            return [self.runner.run(requests[0])]
        joined = {name: np.concatenate([r[name] for r in requests]) for name in self.input_names}
        out = self.runner.run(joined)
        sizes = [len(r[self.input_names[0]]) for r in requests]
        cuts = np.cumsum(sizes)[:-1]
        split = {name: np.split(value, cuts) for name, value in out.items()}
        return [{name: parts[k] for name, parts in split.items()} for k in range(len(requests))]

    def finalize(self):
        self.bundle = self.runner = self.drift = None


class MonitoredPart:
    """A split bundle's part under the runtime monitor's input checks, for the model inputs it reads
    (calibration ranges from the bundle's profile): a tower of a Triton ensemble sees the inputs first."""

    def __init__(self, part, bundle):
        from edgemm.runtime.monitor import Monitor

        graph = {s.name for s in bundle.inputs}
        self.part, self.inputs = part, part.inputs
        self.monitored_inputs = [s.name for s in part.inputs if s.name in graph]
        self.monitor = Monitor(self.monitored_inputs, bundle.calibration_profile,
                               bundle_name=f"{bundle.manifest.name}.{part.name}")

    def run(self, feeds):
        from edgemm.runtime.monitor import timed_run

        return timed_run(self.monitor, self.part.run, feeds, self.monitored_inputs[0])


class DriftMetrics:
    """The edgemm monitor's input checks (``load(..., monitor=True)``: values outside the calibration
    range, NaN/Inf, token ids outside the vocabulary, drift windows) as Triton custom metrics, served on
    Triton's /metrics beside its own nv_* figures. Triton already counts requests and latency."""

    INPUT_FAMILIES = (
        ("edgemm_input_values_total", "values", "Input values the edgemm monitor checked"),
        ("edgemm_input_out_of_range_total", "out_of_range", "Input values outside the calibration range"),
        ("edgemm_input_nonfinite_total", "nonfinite", "NaN or Inf input values"),
        ("edgemm_input_unknown_tokens_total", "unknown_tokens", "Token ids outside the calibration vocabulary"),
    )

    def __init__(self, model: str, version: str, inputs: list[str]):
        labels = {"model": model, "version": str(version)}
        counter = pb_utils.MetricFamily.COUNTER
        self.families = []   # kept alive: a family's metrics go when it is collected
        self.counters = {}   # (stats key, input or None) -> [metric, value already published]
        for name, key, text in self.INPUT_FAMILIES:
            family = pb_utils.MetricFamily(name=name, description=text, kind=counter)
            self.families.append(family)
            for input_name in inputs:
                self.counters[(key, input_name)] = [family.Metric(labels={**labels, "input": input_name}), 0]
        family = pb_utils.MetricFamily(name="edgemm_drift_windows_total", kind=counter,
                                       description="Monitor windows whose out-of-range fraction passed the bound")
        self.families.append(family)
        self.counters[("drift_windows", None)] = [family.Metric(labels=labels), 0]

    def publish(self, stats: dict) -> None:
        for (key, input_name), entry in self.counters.items():
            value = stats.get(key) if input_name is None else (stats["inputs"].get(input_name) or {}).get(key)
            if isinstance(value, (int, float)) and value > entry[1]:
                entry[0].increment(value - entry[1])
                entry[1] = value


def _array(tensor) -> np.ndarray:
    """An input tensor as numpy, through DLPack (see _tensor); copied, as the stub's buffer is reused."""
    if tensor is None:
        raise ValueError("an input is missing")
    return np.array(np.from_dlpack(tensor), copy=True)


def _tensor(name: str, value: np.ndarray):
    """An output tensor handed over through DLPack: the stub of Triton 2.51 reads numpy arrays through
    numpy 1.x's array descriptor layout and, under numpy 2, sends outputs with no bytes (shape right,
    data empty). DLPack is the array's own exchange protocol, the same under both."""
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(value))


def _error(message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
