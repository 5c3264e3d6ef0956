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
