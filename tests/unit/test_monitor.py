"""On-device monitoring (edgemm.runtime.monitor): counts, latency, thread safety, Prometheus text."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from edgemm import runtime
from edgemm.errors import InputError
from edgemm.runtime.monitor import LatencyHistogram
from tests.fixtures.tiny_models import make_data


def feeds(n=2, seed=7):
    return make_data(n, seed=seed)


def test_monitor_is_off_by_default_and_the_plain_run_is_untouched(tiny_bundle):
    b = runtime.load(tiny_bundle)
    assert type(b) is runtime.Bundle and b.monitor is None
    assert type(b).run is runtime.Bundle.run  # no wrapper, no per-call check: zero cost when off
    with pytest.raises(InputError, match="not monitored"):
        b.stats()
    with pytest.raises(InputError, match="without monitor=True"):
        runtime.load(tiny_bundle, on_drift=print)


@pytest.mark.parametrize("option, value", [("max_out_of_range", 1.5), ("window", 0), ("on_drift", 3)])
def test_bad_monitor_options_are_refused(tiny_bundle, option, value):
    with pytest.raises(InputError) as err:
        runtime.load(tiny_bundle, monitor=True, **{option: value})
    assert err.value.field == option


def test_calls_errors_batches_and_latency(tiny_bundle):
    b = runtime.load(tiny_bundle, monitor=True)
    plain = runtime.load(tiny_bundle)
    for n in (1, 1, 3):
        out = b.run(feeds(n))
        ref = plain.run(feeds(n))
        assert all(np.array_equal(out[k], ref[k]) for k in ref)  # monitoring changes no output
    bad = feeds(2)
    bad["image"] = bad["image"][:, :2]  # wrong shape: refused by the runtime, counted as an error
    with pytest.raises(InputError):
        b.run(bad)
    s = b.stats()
    assert (s["calls"], s["errors"]) == (4, 1)
    assert s["batch_sizes"] == {1: 2, 2: 1, 3: 1}
    lat = s["latency_ms"]
    assert lat["count"] == 3 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    json.dumps(s)  # plain data (the Triton backend and `edgemm monitor --json` serialise it)
    b.reset_stats()
    s = b.stats()
    assert (s["calls"], s["errors"], s["batch_sizes"], s["latency_ms"]["p50"]) == (0, 0, {}, None)


def test_latency_histogram_is_bounded_and_close_to_exact():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=0.0, sigma=1.0, size=20000)  # ms
    h = LatencyHistogram()
    for ms in samples:
        h.add(float(ms))
    assert len(h.counts) == len(LatencyHistogram.BOUNDS_MS) + 1  # fixed, whatever the number of calls
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(samples, q))
        assert abs(h.quantile(q) / exact - 1) < 0.04, q
    h.add(1e9)  # beyond the last bucket: the overflow bucket, reported as the max seen
    assert h.quantile(1.0) == 1e9


def test_counts_stay_exact_under_8_threads(tiny_bundle):
    b = runtime.load(tiny_bundle, monitor=True)
    good, bad = feeds(1), feeds(1)
    bad["input_ids"] = bad["input_ids"].astype(np.int32)  # wrong dtype: an error every 10th call
    barrier = threading.Barrier(8)
    failures = []

    def worker():
        barrier.wait()
        for i in range(500):
            try:
                b.run(bad if i % 10 == 0 else good)
            except InputError:
                pass
            except Exception as exc:  # pragma: no cover - reported below
                failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    s = b.stats()
    assert s["calls"] == 4000 and s["errors"] == 400
    assert s["batch_sizes"] == {1: 4000} and s["latency_ms"]["count"] == 3600
    assert s["inputs"]["image"]["values"] == 4000 * good["image"].size


def test_prometheus_text_parses(tiny_bundle):
    from prometheus_client.parser import text_string_to_metric_families

    b = runtime.load(tiny_bundle, monitor=True)
    for n in (1, 2, 2):
        b.run(feeds(n))
    with pytest.raises(InputError):
        b.run({"image": feeds(1)["image"]})
    families = {f.name: f for f in text_string_to_metric_families(b.metrics_text())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    name = ("bundle", b.manifest["name"])
    assert samples[("edgemm_calls_total", (name,))] == 4
    assert samples[("edgemm_errors_total", (name,))] == 1
    assert samples[("edgemm_batch_size_calls_total", (("batch_size", "2"), name))] == 2
    assert families["edgemm_latency_seconds"].type == "histogram"
    assert samples[("edgemm_latency_seconds_count", (name,))] == 3
    assert samples[("edgemm_latency_seconds_bucket", (name, ("le", "+Inf")))] == 3
    buckets = [s.value for s in families["edgemm_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    p50 = samples[("edgemm_latency_quantile_seconds", (name, ("quantile", "0.5")))]
    assert p50 == pytest.approx(b.stats()["latency_ms"]["p50"] / 1000)
    assert samples[("edgemm_input_values_total", (name, ("input", "image")))] == 6 * feeds(1)["image"].size  # the refused call's image too


def test_old_bundle_without_profile_reports_latency_and_says_drift_is_unknown(tiny_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("calibration_profile", None)
    (old / "manifest.json").write_text(json.dumps(manifest))  # unhashed: editing it keeps the bundle loadable
    b = runtime.load(old, monitor=True)
    b.run(feeds(2))
    s = b.stats()
    assert s["calls"] == 1 and s["drift"].startswith("unknown")
    assert s["inputs"]["image"]["out_of_range_fraction"] is None
    assert "edgemm_drift_known" in b.metrics_text()


# ---- drift against the calibration profile -------------------------------------------------------------

def test_compile_records_a_calibration_profile(tiny_bundle, tiny):
    from edgemm.data import load_dataset

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    profile = manifest["calibration_profile"]
    n = manifest["calibration"]["samples"]
    calib = load_dataset(tiny["calib"]).arrays
    image, ids = calib["image"][:n], calib["input_ids"][:n]  # the samples that calibrated (the rest judged)
    assert profile["samples"] == n
    img = profile["inputs"]["image"]
    assert (img["min"], img["max"]) == (float(image.min()), float(image.max()))
    assert img["nonfinite"] == 0 and img["kind"] == "float"
    assert img["percentiles"]["p50"] == pytest.approx(float(np.median(image)), abs=1e-4)
    tok = profile["inputs"]["input_ids"]
    assert tok["kind"] == "tokens" and tok["vocab_size"] == 50  # the embedding table's rows, from the graph
    assert tok["distinct"] == len(np.unique(ids)) and tok["vocab_coverage"] == pytest.approx(len(np.unique(ids)) / 50)
    assert tok["zero_fraction"] == pytest.approx(float((ids == 0).mean()))
    assert set(profile["outputs"]) == {o["name"] for o in manifest["outputs"]}
    assert all(o["nonfinite"] == 0 and o["min"] <= o["max"] for o in profile["outputs"].values())


def _fraction(bundle, data, field="out_of_range_fraction"):
    bundle.reset_stats()
    try:
        bundle.run(data)
    except InputError:
        pass
    return {name: f[field] for name, f in bundle.stats()["inputs"].items()}


def test_in_distribution_data_is_near_zero_and_shifts_are_flagged(tiny_bundle):
    b = runtime.load(tiny_bundle, monitor=True)
    fresh = feeds(16, seed=99)  # same distribution as calibration, other samples
    assert max(_fraction(b, fresh).values()) < 0.005
    low, high = b.stats()["inputs"]["image"]["range"]
    for shifted, at_least in ((fresh["image"] * 3, 0.1), (fresh["image"] + 5, 0.8)):
        got = _fraction(b, dict(fresh, image=shifted))
        assert got["image"] == pytest.approx(float(((shifted < low) | (shifted > high)).mean()))
        assert got["image"] > at_least and got["input_ids"] == 0


def test_nan_and_unknown_tokens_are_counted_even_when_the_call_is_refused(tiny_bundle):
    b = runtime.load(tiny_bundle, monitor=True)
    nan = feeds(2)
    nan["image"][0, 0, :2, :2] = np.nan  # 4 NaN values
    nan["image"][1, 0, 0, 0] = np.inf
    assert _fraction(b, nan, "nonfinite")["image"] == 5
    s = b.stats()
    assert s["errors"] == 1 and s["inputs"]["image"]["out_of_range"] >= 5  # NaN is in no calibrated range
    oov = feeds(2)
    oov["input_ids"][:, :4] = 50 + np.arange(4)  # the table has 50 rows: half of the ids index none
    assert _fraction(b, oov, "unknown_token_fraction")["input_ids"] == pytest.approx(0.5)
    assert b.stats()["inputs"]["input_ids"]["out_of_range_fraction"] == pytest.approx(0.5)


def test_callback_fires_once_per_window_past_the_bound(tiny_bundle):
    events = []
    b = runtime.load(tiny_bundle, monitor=True, on_drift=events.append, max_out_of_range=0.01, window=5)
    fresh = feeds(2, seed=5)
    for _ in range(10):
        b.run(fresh)
    assert events == []  # in distribution: no alert
    shifted = dict(fresh, image=fresh["image"] + 5)
    for _ in range(12):  # windows 3 and 4 drifted; window 5 is still open
        b.run(shifted)
    assert len(events) == 2
    event = events[0]
    assert set(event["inputs"]) == {"image"} and event["window_calls"] == 5
    assert event["inputs"]["image"]["out_of_range_fraction"] > 0.8 and event["max_out_of_range"] == 0.01
    assert b.stats()["drift_windows"] == 2


def test_failing_callback_does_not_fail_inference(tiny_bundle):
    def boom(event):
        raise RuntimeError("pager down")

    b = runtime.load(tiny_bundle, monitor=True, on_drift=boom, window=1)
    data = feeds(1)
    data["image"] = data["image"] + 5
    assert set(b.run(data)) == {o.name for o in b.outputs}
    assert b.stats()["callback_errors"] == 1


def test_prometheus_text_carries_drift(tiny_bundle):
    from prometheus_client.parser import text_string_to_metric_families

    b = runtime.load(tiny_bundle, monitor=True)
    data = feeds(2)
    data["image"] = data["image"] + 5
    b.run(data)
    got = {(s.name, s.labels.get("input")): s.value
           for f in text_string_to_metric_families(b.metrics_text()) for s in f.samples}
    assert got[("edgemm_input_out_of_range_fraction", "image")] == pytest.approx(
        b.stats()["inputs"]["image"]["out_of_range_fraction"])
    assert got[("edgemm_input_unknown_token_fraction", "input_ids")] == 0
    assert got[("edgemm_drift_known", None)] == 1


@pytest.mark.parametrize("edit, field", [
    (lambda p: p["inputs"]["image"].update(min=5.0), "calibration_profile.inputs.image"),      # min > max
    (lambda p: p["inputs"]["input_ids"].update(vocab_size=-3), "calibration_profile.inputs.input_ids"),
    (lambda p: p.update(inputs=[1, 2]), "calibration_profile.inputs"),
    (lambda p: p.update(samples="many"), "calibration_profile.samples"),
])
def test_malformed_profile_is_refused_at_load(tiny_bundle, tmp_path, edit, field):
    from edgemm.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest["calibration_profile"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as err:
        runtime.load(copy, monitor=True)
    assert err.value.field == field


def test_profile_is_a_typed_manifest_section(tiny_bundle):
    b = runtime.load(tiny_bundle)
    profile = b.calibration_profile
    assert profile.inputs["input_ids"].vocab_size == 50 and profile.inputs["image"].has_range
    assert profile.inputs["image"].low == b.manifest.to_dict()["calibration_profile"]["inputs"]["image"]["min"]
    assert set(profile.outputs) == {o.name for o in b.outputs}


def test_a_format_1_bundle_is_monitored_without_drift(tmp_path):
    """A bundle written before the profile existed (tests/fixtures/bundle_v1): latency and errors only."""
    from pathlib import Path

    v1 = Path(__file__).parents[1] / "fixtures" / "bundle_v1"
    b = runtime.load(v1, monitor=True)
    assert b.calibration_profile is None
    b.run({"image": np.zeros((2, 3, 16, 16), np.float32), "input_ids": np.ones((2, 8), np.int64)})
    s = b.stats()
    assert (s["calls"], s["errors"], s["batch_sizes"]) == (1, 0, {2: 1}) and s["drift"].startswith("unknown")
    assert all(f["out_of_range_fraction"] is None for f in s["inputs"].values())


def test_a_mask_calibrated_without_padding_accepts_padding():
    from edgemm.runtime.calibration_section import TensorProfile
    from edgemm.runtime.monitor import probes_from_entries

    entries = {"attention_mask": TensorProfile("mask", 1.0, 1.0), "input_ids": TensorProfile("tokens", 5.0, 90.0, 100)}
    (mask, ids), known = probes_from_entries(["attention_mask", "input_ids"], entries)
    padded = np.array([[1, 1, 0, 0]], np.int64)
    assert known and mask.measure(padded) == (4, 0, 0, 0)
    assert mask.measure(padded + 1)[1] == 2                  # a 2 is no mask value: counted
    assert ids.measure(np.array([[5, 90, 91, 100]]))[1:] == (2, 0, 1)  # 91 and 100 outside; 100 is no row
