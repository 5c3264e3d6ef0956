"""Top-1 agreement over decisive samples (parity/metrics.py:Top1Count): a sample whose reference top-2
margin is within the precision's noise is a near-tie and is skipped, reported as such; too few decisive
samples and top-1 parity is not claimed; a broken bundle still fails, because which samples are decisive
is decided by the reference and the precision, never by the bundle's own error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.data import Dataset
from edgemm.parity.metrics import MIN_DECISIVE, ParityAccumulator, Top1Count, top1_text
from edgemm.parity.thresholds import defaults_for
from edgemm.parity.verify import evaluate
from edgemm.precision import spec
from edgemm.quant.cpu_int8 import top1_agreement

INT8 = defaults_for("int8")
N, C = 32, 16


def _near_constant(rng, n=N):
    """Random-init CLIP-like similarity rows: offset 5, spread 0.005 (below INT8's resolution at 5)."""
    return (5.0 + 0.005 * rng.standard_normal((n, C))).astype(np.float32)


def _decisive(rng, n=N):
    """Class scores with a clear winner: top-2 margin ~1.5 at a row max ~3."""
    rows = rng.standard_normal((n, C)).astype(np.float32) * 0.3
    rows[np.arange(n), rng.integers(0, C, n)] += 2.5
    return rows


def _int8_noise(rng, ref):
    """Error the size INT8 leaves: std = score_noise x the row's max |score|."""
    scale = np.abs(ref).max(-1, keepdims=True)
    return (ref + spec("int8").score_noise * scale * rng.standard_normal(ref.shape)).astype(np.float32)


def _evaluate(ref, got, thresholds=INT8):
    data = Dataset(Path("synthetic"), {"i": np.arange(len(ref), dtype=np.int64)[:, None]}, None, "")
    return evaluate(lambda b: {"logits": got[b["i"][:, 0]]}, lambda b: {"logits": ref[b["i"][:, 0]]}, data,
                    thresholds, output_names=["logits"], heads={"logits": True})


def test_near_tied_rows_are_skipped_and_top1_parity_is_not_claimed():
    rng = np.random.default_rng(0)
    ref = _near_constant(rng)
    got = _int8_noise(rng, ref)
    raw = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    assert raw < INT8.min_top1_agreement  # the old check failed this bundle on rounding noise alone
    report = _evaluate(ref, got)
    out = report["outputs"]["logits"]
    assert report["passed"], report["failures"]
    assert "top1_agreement" not in out and out["top1_decisive"] == 0 and out["top1_near_ties"] == N
    assert out["top1_all_samples"] == raw  # still shown, for information
    assert top1_text(out).startswith(f"top-1 not judged: 0 of {N} samples decisive")


def test_mixed_rows_judge_the_decisive_ones_and_say_how_many_were_skipped():
    rng = np.random.default_rng(1)
    ref = np.concatenate([_decisive(rng, 20), _near_constant(rng, 12)])
    got = _int8_noise(rng, ref)
    report = _evaluate(ref, got)
    out = report["outputs"]["logits"]
    assert report["passed"], report["failures"]
    assert out["top1_decisive"] == 20 and out["top1_near_ties"] == 12 and out["top1_agreement"] == 1.0
    assert top1_text(out) == "1.0000 over 20 decisive samples, 12 near-ties skipped"


def test_a_broken_bundle_still_fails_top1_on_decisive_samples():
    """Flipping the winner on a quarter of clearly decided samples fails the gate; so does a bundle whose
    error is fifty times INT8's: its noise does not turn the reference's decisive samples into near-ties."""
    rng = np.random.default_rng(2)
    ref = _decisive(rng, 40)
    flipped = ref.copy()
    rows = np.arange(0, 40, 4)
    winners = ref[rows].argmax(-1)
    flipped[rows, (winners + 1) % C] = ref[rows, winners] + 1.0
    report = _evaluate(ref, flipped)
    assert not report["passed"]
    assert report["outputs"]["logits"]["top1_decisive"] == 40
    assert "output logits: top-1 agreement 0.7500 < 0.95" in report["failures"], report["failures"]

    noisy = (ref + 50 * spec("int8").score_noise * np.abs(ref).max(-1, keepdims=True)
             * rng.standard_normal(ref.shape)).astype(np.float32)
    report = _evaluate(ref, noisy)
    assert report["outputs"]["logits"]["top1_decisive"] == 40  # decided by the reference, not the noise
    assert report["outputs"]["logits"]["top1_agreement"] < INT8.min_top1_agreement
    assert not report["passed"]


def test_too_few_decisive_samples_are_not_judged_unless_they_are_all_there_is():
    rng = np.random.default_rng(3)
    few = np.concatenate([_decisive(rng, MIN_DECISIVE - 1), _near_constant(rng, 20)])
    count = Top1Count(spec("int8").score_noise)
    count.add(few, few)
    assert count.decisive == MIN_DECISIVE - 1 and count.agreement is None
    small = _decisive(rng, 4)   # four samples, all decisive: judged as before (nothing was skipped)
    count = Top1Count(spec("int8").score_noise)
    count.add(small, small)
    assert count.agreement == 1.0


def test_one_implementation_recipe_search_and_gate_count_alike():
    rng = np.random.default_rng(4)
    ref = np.concatenate([_decisive(rng, 24), _near_constant(rng, 8)])
    got = _int8_noise(rng, ref)
    got[:6] = np.roll(got[:6], 1, axis=-1)   # six decisive flips
    acc = ParityAccumulator({"logits": True}, score_noise=spec("int8").score_noise)
    acc.add({"logits": ref}, {"logits": got})
    gate = acc.result()["logits"]
    assert gate.top1_decisive == 24 and gate.top1_agreement == 18 / 24
    assert top1_agreement(ref, got, "int8") == gate.top1_agreement
    # FP32's noise is a rounding error: nothing but exact ties is skipped there
    fp32 = Top1Count(spec("fp32").score_noise)
    fp32.add(ref, got)
    assert fp32.decisive == N
