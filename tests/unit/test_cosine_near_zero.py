"""Mean cosine over the samples whose direction the precision determines (parity/metrics.py:CosineCount):
a sample whose reference RMS is within the atol (the precision's noise x the output's median sample RMS)
of zero is near-zero, judged by its absolute error against that atol and counted apart. Which samples are
near-zero is decided by the reference and the precision, never by the bundle's error, so a broken bundle
still fails (on the near-zero rows by their error, on the others by their cosine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.data import Dataset
from edgemm.parity.metrics import NEAR_ZERO_NOISES, SCALE_PERCENTILE, CosineCount, ParityAccumulator, cosine_text
from edgemm.parity.thresholds import defaults_for
from edgemm.parity.verify import evaluate
from edgemm.precision import spec
from edgemm.quant.cpu_int8 import agreement_of

INT8 = defaults_for("int8")
NOISE = spec("int8").score_noise
N, C, NEAR = 32, 32, 4


def _similarity(rng):
    """Random-init [B, B] similarity rows: each nearly constant (the text embeddings nearly coincide), at
    offsets of 0.2-1.0 either sign, the last NEAR rows within 1% of the typical scale of 0 (their image embedding is
    almost orthogonal to the common text direction)."""
    offsets = rng.choice([-1.0, 1.0], N) * rng.uniform(0.2, 1.0, N)
    offsets[-NEAR:] = 0.004 * rng.choice([-1.0, 1.0], NEAR)
    return (offsets[:, None] + 0.0005 * rng.standard_normal((N, C))).astype(np.float32)


def _int8_noise(rng, ref):
    """Error of INT8's size at the output's scale: std = 2x noise x the median row RMS (a per-tensor
    quantization step does not shrink for rows close to 0)."""
    typical = np.median(np.sqrt((ref.astype(np.float64) ** 2).mean(1)))
    return (ref + 2 * NOISE * typical * rng.standard_normal(ref.shape)).astype(np.float32)


def _evaluate(ref, got, thresholds=INT8):
    data = Dataset(Path("synthetic"), {"i": np.arange(len(ref), dtype=np.int64)[:, None]}, None, "")
    return evaluate(lambda b: {"similarity": got[b["i"][:, 0]]}, lambda b: {"similarity": ref[b["i"][:, 0]]},
                    data, thresholds, output_names=["similarity"], heads={"similarity": False}, batch_size=8)


def test_near_zero_rows_are_judged_by_absolute_error_not_cosine():
    rng = np.random.default_rng(0)
    ref = _similarity(rng)
    got = _int8_noise(rng, ref)
    old = CosineCount()             # the old rule: every sample's cosine, whatever its reference
    old.add(ref, got)
    assert old.fields()["mean_cosine"] < INT8.min_cosine  # failed on rounding noise alone
    report = _evaluate(ref, got)
    out = report["outputs"]["similarity"]
    assert report["passed"], report["failures"]
    assert out["near_zero_samples"] == NEAR and out["cosine_samples"] == N - NEAR and out["near_zero_over"] == 0
    assert out["mean_cosine"] >= INT8.min_cosine
    scale = np.percentile(np.sqrt((ref.astype(np.float64) ** 2).mean(1)), SCALE_PERCENTILE)
    assert np.isclose(out["near_zero_atol"], NEAR_ZERO_NOISES * NOISE * scale)  # from the reference alone
    assert cosine_text(out) == (f"mean cosine {out['mean_cosine']:.6f} over {N - NEAR} samples; {NEAR} near-zero "
                                f"samples within atol {out['near_zero_atol']:.3g}")


def test_a_broken_bundle_still_fails_on_near_zero_rows_and_on_the_others():
    rng = np.random.default_rng(1)
    ref = _similarity(rng)
    got = _int8_noise(rng, ref)
    wrong_zero = got.copy()
    wrong_zero[-NEAR:] += 0.2        # the near-zero rows answer 0.2 where the reference says ~0
    report = _evaluate(ref, wrong_zero)
    out = report["outputs"]["similarity"]
    assert not report["passed"]
    assert out["near_zero_samples"] == NEAR and out["near_zero_over"] == NEAR  # the error excused nothing
    assert out["mean_cosine"] >= INT8.min_cosine                              # the other rows are fine
    assert any(f"{NEAR} of {NEAR} near-zero samples off by more than atol" in f for f in report["failures"])

    wrong_rest = got.copy()
    wrong_rest[:8] = -wrong_rest[:8]  # eight ordinary rows with the sign flipped
    report = _evaluate(ref, wrong_rest)
    assert not report["passed"] and report["outputs"]["similarity"]["near_zero_samples"] == NEAR
    assert any(f.startswith("output similarity: mean cosine") for f in report["failures"])

    huge = (ref + 30 * (got - ref)).astype(np.float32)   # 30x INT8's error everywhere
    report = _evaluate(ref, huge)
    assert report["outputs"]["similarity"]["near_zero_samples"] == NEAR   # decided by the reference
    assert not report["passed"]


def test_fp32_noise_leaves_every_sample_to_its_cosine():
    rng = np.random.default_rng(2)
    ref = _similarity(rng)
    count = CosineCount(spec("fp32").score_noise)
    count.add(ref, ref)
    assert "near_zero_samples" not in count.fields()
    all_zero = CosineCount(NOISE)            # an output that is 0 everywhere: nothing is called near-zero
    all_zero.add(np.zeros((4, 3)), np.zeros((4, 3)))
    assert all_zero.fields() == {"mean_cosine": 1.0, "min_cosine": 1.0}


def test_one_implementation_recipe_search_and_gate_count_alike():
    rng = np.random.default_rng(3)
    ref = _similarity(rng)
    got = _int8_noise(rng, ref)
    acc = ParityAccumulator({"similarity": False}, score_noise=NOISE)
    for start in range(0, N, 8):
        acc.add({"similarity": ref[start:start + 8]}, {"similarity": got[start:start + 8]})
    gate = acc.result()["similarity"]
    search = agreement_of(ref, got, "int8")
    assert search["value"] == gate.mean_cosine and search["near_zero"] == gate.near_zero_samples == NEAR
    assert search["near_zero_over"] == 0
    broken = got.copy()
    broken[-1] += 0.2
    assert agreement_of(ref, broken, "int8")["near_zero_over"] == 1
    assert "near_zero" not in agreement_of(ref, got)       # no precision: every cosine counts, as before


def test_a_few_outlying_samples_do_not_excuse_the_typical_ones():
    """The scale is a high percentile of the sample RMS, not the maximum: two samples 100x larger than
    the rest leave the typical samples to their cosine, so wrong typical rows still fail."""
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((40, 16))
    ref[:2] *= 100.0
    wrong = ref.copy()
    wrong[2:] = rng.standard_normal((38, 16))     # every typical row wrong
    count = CosineCount(NOISE)
    count.add(ref, wrong)
    fields = count.fields()
    assert "near_zero_samples" not in fields and fields["mean_cosine"] < 0.5


def test_split_parts_count_cosine_as_verify_does():
    """A split bundle's parts, each run on its own, are judged with the same CosineCount."""
    from types import SimpleNamespace

    from edgemm.parity.split_parts import check_parts

    rng = np.random.default_rng(5)
    ref = _similarity(rng)

    def bundle_of(answer):
        part = SimpleNamespace(inputs=[SimpleNamespace(name="i")], after=[], precision="int8", placement="cpu",
                               run=lambda feeds: {"similarity": answer[feeds["i"][:, 0]]})
        return SimpleNamespace(inputs=[SimpleNamespace(name="i")], outputs=[SimpleNamespace(name="similarity")],
                               parts=["fusion"], part=lambda name: part, run=lambda feeds, reuse=None: part.run(feeds))

    data = Dataset(Path("synthetic"), {"i": np.arange(N, dtype=np.int64)[:, None]}, None, "")
    reference = lambda feeds: {"similarity": ref[feeds["i"][:, 0]]}  # noqa: E731
    got = _int8_noise(rng, ref)
    ok = check_parts(bundle_of(got), data, reference_run=reference, min_cosine=INT8.min_cosine, batch_size=8,
                     score_noise=NOISE)
    assert not ok["failures"] and ok["parts"]["fusion"]["outputs"]["similarity"]["near_zero_samples"] == NEAR
    broken = got.copy()
    broken[-NEAR:] += 0.2
    bad = check_parts(bundle_of(broken), data, reference_run=reference, min_cosine=INT8.min_cosine, batch_size=8,
                      score_noise=NOISE)
    assert any(f.startswith("part fusion: similarity: 4 of 4 near-zero samples off") for f in bad["failures"])


def test_the_accuracy_search_counts_cosine_as_the_gate_does():
    """The per-layer accuracy search (quant/accuracy_eval.py) decides cosine targets with CosineCount too:
    INT8-sized error passes its cosine target, a bundle wrong on the near-zero rows does not."""
    from edgemm.quant.accuracy_eval import Evaluator
    from edgemm.quant.accuracy_target import parse_accuracy_target

    rng = np.random.default_rng(6)
    ref = _similarity(rng)
    got = _int8_noise(rng, ref)
    broken = got.copy()
    broken[-NEAR:] += 0.2
    feeds = {"i": np.arange(N, dtype=np.int64)[:, None]}
    runner = lambda answer: (lambda f: {"similarity": answer[f["i"][:, 0]]})  # noqa: E731
    target = parse_accuracy_target("cosine>=0.99")
    ev = Evaluator(runner(ref), feeds, target, output_names=["similarity"], batch_size=8, confidence=None,
                   score_noise=NOISE)
    assert ev.measure(runner(got)).check.met
    bad = ev.measure(runner(broken)).check
    assert not bad.met and "near-zero samples off by more than atol" in bad.failures[0]
    raw = Evaluator(runner(ref), feeds, target, output_names=["similarity"], batch_size=8, confidence=None)
    assert not raw.measure(runner(got)).check.met   # every sample's cosine: INT8 noise alone failed it
