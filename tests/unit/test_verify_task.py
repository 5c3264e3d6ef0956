"""Which task metric verify computes when the bundle does not say: a lone output is what top-1 reads,
and labels that no metric uses are reported, not silently dropped."""

from pathlib import Path

import numpy as np
import pytest

from edgemm.data import Dataset
from edgemm.errors import InputError
from edgemm.parity.thresholds import defaults_for
from edgemm.parity.verify import evaluate
from edgemm.task import resolve


def test_top1_on_a_single_output_needs_no_metric_outputs():
    assert resolve(["output"], metric="top1") == ("top1", ["output"])
    with pytest.raises(InputError, match="--metric-outputs"):
        resolve(["a", "b"], metric="top1")


def test_unused_labels_are_reported():
    rng = np.random.default_rng(0)
    data = Dataset(Path("eval.npz"), {"x": rng.standard_normal((8, 4)).astype(np.float32)},
                   rng.integers(0, 3, 8), "")

    def run(feeds):
        return {"output": feeds["x"][:, :3] * 2.0}

    report = evaluate(run, run, data, defaults_for("fp32"), output_names=["output"], task=None)
    assert report["passed"] and "labels were not used" in report["notes"][0]
    with_task = evaluate(run, run, data, defaults_for("fp32"), output_names=["output"], task=("top1", ["output"]))
    assert "notes" not in with_task and with_task["task"]["metric"] == "top1"
