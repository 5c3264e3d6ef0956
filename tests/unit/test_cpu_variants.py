"""Portable CPU bundles: variants, the runtime's choice by host ISA, and the OpenVINO session."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemm import hostinfo, runtime
from edgemm.errors import BundleError, InputError
from edgemm.runtime.variants import choose_variant
from tests.fixtures.tiny_models import make_data

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"
SAPPHIRE_RAPIDS = hostinfo.host_isa((SAMPLES / "intel_xeon_sapphire_rapids.txt").read_text())
HASWELL = hostinfo.host_isa((SAMPLES / "intel_xeon_haswell_avx2.txt").read_text())
BF16 = ["amx_bf16", "avx512_bf16"]
INT8 = ["amx_int8", "asimddp", "avx512_vnni", "avx_vnni", "i8mm"]


def variant(name, backend, need):
    return {"name": name, "backend": {"name": backend}, "requires_any": need}


VARIANTS = [variant("openvino-bf16", "openvino", BF16), variant("openvino-int8", "openvino", INT8),
            variant("onnxruntime-int8", "onnxruntime", INT8)]


def test_amx_host_runs_the_bf16_variant():
    choice = choose_variant(VARIANTS, SAPPHIRE_RAPIDS, installed=lambda b: True)
    assert choice.name == "openvino-bf16" and choice.warning is None
    assert "amx_bf16" in choice.reason


def test_host_without_bf16_runs_the_int8_variant_and_says_why():
    no_bf16 = SAPPHIRE_RAPIDS - {"amx_bf16", "avx512_bf16"}
    choice = choose_variant(VARIANTS, no_bf16, installed=lambda b: True)
    assert choice.name == "openvino-int8" and choice.warning is None
    assert any("openvino-bf16" in s for s in choice.skipped)


def test_without_openvino_the_ort_fallback_runs():
    choice = choose_variant(VARIANTS, SAPPHIRE_RAPIDS, installed=lambda b: b == "onnxruntime")
    assert choice.name == "onnxruntime-int8"
    assert any("not installed" in s for s in choice.skipped)


def test_host_lacking_every_feature_runs_the_fallback_with_a_warning():
    choice = choose_variant(VARIANTS, HASWELL, installed=lambda b: True)
    assert choice.name == "onnxruntime-int8"
    assert choice.warning and "emulated" in choice.warning


# ---------------------------------------------------------------------------------------------------
# A real bundle with an AMX/BF16 OpenVINO variant beside its ONNX Runtime model

openvino = pytest.importorskip("openvino")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bf16_bundle(tiny_bundle, tmp_path_factory):
    """The tiny FP32 bundle plus an OpenVINO BF16 variant needing AMX-BF16/AVX512-BF16, as compile writes it."""
    from edgemm.backends import openvino as ovb

    out = tmp_path_factory.mktemp("variants") / "tiny-bf16"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    section = ovb.save_variant(ovb.read_onnx(out / "model.onnx"), out, "openvino-bf16", "bf16")
    manifest["variants"] = [{"name": "openvino-bf16", "engine": "openvino", "precision": "bf16",
                             "requires_any": BF16, "backend": section},
                            {"name": "onnxruntime-fp32", "engine": "onnxruntime", "precision": "fp32",
                             "requires_any": [], "backend": manifest["backend"]}]
    manifest["requires"] = sorted(set(manifest.get("requires", [])) | {"variants"})
    for rel in (section["model"], section["weights"]):
        manifest["files"][rel] = _sha(out / rel)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_bundle_on_an_amx_host_runs_openvino_bf16(bf16_bundle, monkeypatch):
    monkeypatch.setattr(hostinfo, "host_isa", lambda text=None: SAPPHIRE_RAPIDS)
    bundle = runtime.load(bf16_bundle)
    assert bundle.variant == "openvino-bf16" and bundle.backend == "openvino"
    reference = runtime.load(bf16_bundle, variant="onnxruntime-fp32")
    feeds = make_data(4, seed=3)
    got, want = bundle.run(feeds), reference.run(feeds)
    assert list(got) == list(want)
    for name in want:
        a, b = want[name].ravel(), got[name].ravel()
        assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def test_bundle_with_amx_and_bf16_hidden_chooses_its_other_variant(bf16_bundle, monkeypatch, caplog):
    monkeypatch.setattr(hostinfo, "host_isa", lambda text=None: SAPPHIRE_RAPIDS - {"amx_bf16", "avx512_bf16",
                                                                                  "amx_tile", "amx_int8"})
    with caplog.at_level(logging.INFO, logger="edgemm"):
        bundle = runtime.load(bf16_bundle)
    assert bundle.variant == "onnxruntime-fp32" and bundle.backend == "onnxruntime"
    assert "running variant onnxruntime-fp32" in caplog.text
    assert bundle.run(make_data(2, seed=1))["logits"].shape == (2, 5)


def test_asking_for_a_variant_the_host_lacks_warns(bf16_bundle, monkeypatch, caplog):
    monkeypatch.setattr(hostinfo, "host_isa", lambda text=None: HASWELL)
    with caplog.at_level(logging.WARNING, logger="edgemm"):
        bundle = runtime.load(bf16_bundle, variant="openvino-bf16")
    assert bundle.variant == "openvino-bf16"
    assert "emulated" in caplog.text
    with pytest.raises(InputError, match="no variant 'gpu'"):
        runtime.load(bf16_bundle, variant="gpu")


def test_openvino_variant_reads_only_hash_checked_bytes(bf16_bundle, tmp_path, monkeypatch):
    copy = tmp_path / "b"
    shutil.copytree(bf16_bundle, copy)
    monkeypatch.setattr(hostinfo, "host_isa", lambda text=None: SAPPHIRE_RAPIDS)
    from edgemm.runtime import manifest as manifest_mod

    real = manifest_mod.verify_files

    def swap_after_check(bundle_dir, manifest):  # the weights change after load() checked them
        real(bundle_dir, manifest)
        weights = Path(bundle_dir) / "openvino" / "openvino-bf16.bin"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))

    monkeypatch.setattr(manifest_mod, "verify_files", swap_after_check)
    with pytest.raises(BundleError, match="does not match its sha256"):
        runtime.load(copy)


def test_openvino_variant_runtime_imports_neither_torch_nor_nncf(bf16_bundle, tiny_bundle):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import edgemm.runtime as rt\n"
        f"plain = rt.load({str(tiny_bundle)!r})\n"
        "assert 'openvino' not in sys.modules, 'a bundle without OpenVINO variants imported openvino'\n"
        f"b = rt.load({str(bf16_bundle)!r}, variant='openvino-bf16')\n"
        "out = b.run({'image': np.zeros((1, 3, 16, 16), np.float32), 'input_ids': np.ones((1, 8), np.int64)})\n"
        "assert out['logits'].shape == (1, 5) and b.backend == 'openvino'\n"
        "print('LOADED', [m for m in ('torch', 'nncf', 'onnx', 'modelopt') if m in sys.modules])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout


def test_batch_routes_follow_the_measured_winner_per_batch():
    from edgemm.runtime.variants import BatchRoutedSession, batch_routes

    measured = [dict(variant("openvino-int8", "openvino", INT8), measured={"p50_ratio": {"1": 0.40, "8": 0.32}}),
                dict(variant("onnxruntime-int8", "onnxruntime", INT8), measured={"p50_ratio": {"1": 0.37, "8": 0.40}})]
    # within 10% at batch 1 (0.37 vs 0.40): the chosen variant keeps it; nothing to route
    assert batch_routes(measured, 0, SAPPHIRE_RAPIDS, installed=lambda b: True) is None
    measured[1]["measured"]["p50_ratio"]["1"] = 0.30
    routes = batch_routes(measured, 0, SAPPHIRE_RAPIDS, installed=lambda b: True)
    assert routes == {1: 1, 8: 0}
    # a variant the host would run emulated, or whose engine is missing, is never routed to
    assert batch_routes(measured, 0, HASWELL, installed=lambda b: True) is None
    assert batch_routes(measured, 0, SAPPHIRE_RAPIDS, installed=lambda b: b == "openvino") is None

    class Fake:
        backend = "x"

        def __init__(self, tag):
            self.tag = tag

        def run(self, feeds):
            return [self.tag]

    router = BatchRoutedSession({0: Fake("ov"), 1: Fake("ort")}, routes, "x", primary=0)
    assert [router.run({"x": np.zeros((n, 2))})[0] for n in (1, 2, 3, 8, 32)] == ["ort", "ort", "ov", "ov", "ov"]


def test_bundle_routes_calls_by_batch_size(bf16_bundle, tmp_path, monkeypatch):
    copy = tmp_path / "routed"
    shutil.copytree(bf16_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["variants"][0]["measured"] = {"p50_ratio": {"1": 0.9, "8": 0.3}}     # OpenVINO wins batch 8
    manifest["variants"][1]["measured"] = {"p50_ratio": {"1": 0.5, "8": 1.0}}     # ORT wins batch 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(hostinfo, "host_isa", lambda text=None: SAPPHIRE_RAPIDS)
    bundle = runtime.load(copy)
    assert bundle.variant == "openvino-bf16"
    assert bundle.variant_routes == {1: "onnxruntime-fp32", 8: "openvino-bf16"}
    reference = runtime.load(copy, variant="onnxruntime-fp32")
    assert reference.variant_routes is None
    for n in (1, 8):
        feeds = make_data(n, seed=n)
        got, want = bundle.run(feeds), reference.run(feeds)
        if n == 1:   # the ORT session ran it: identical to the ORT variant
            assert all(np.array_equal(got[k], want[k]) for k in want)
        else:        # OpenVINO BF16 ran it: close, not identical
            assert not all(np.array_equal(got[k], want[k]) for k in want)
            assert all(np.allclose(got[k], want[k], atol=0.05) for k in want)


def test_inspect_shows_the_variants_and_which_one_this_host_runs(bf16_bundle, cli):
    res = cli("inspect", bf16_bundle)
    assert res.returncode == 0, res.stderr
    assert "variants (fastest first" in res.stdout
    assert "openvino-bf16: openvino bf16, needs one of amx_bf16, avx512_bf16" in res.stdout
    assert "onnxruntime-fp32: onnxruntime fp32, needs one of nothing in particular" in res.stdout
    here = "openvino-bf16" if hostinfo.host_isa() & {"amx_bf16", "avx512_bf16"} else "onnxruntime-fp32"
    assert f"this host runs {here}" in res.stdout
    info = json.loads(cli("inspect", bf16_bundle, "--json").stdout)
    assert [v["name"] for v in info["variants"]] == ["openvino-bf16", "onnxruntime-fp32"]


@pytest.mark.parametrize("tamper, field", [
    (lambda m: m.__setitem__("variants", {}), "variants"),
    (lambda m: m["variants"][0].__setitem__("requires_any", "avx512_bf16"), "variants.[0].requires_any"),
    (lambda m: m["variants"][1].__setitem__("name", "openvino-bf16"), "variants.[1]"),
    (lambda m: m["variants"][0]["backend"].__setitem__("weights", 3), "variants.[0].backend.weights"),
])
def test_malformed_variants_are_refused(bf16_bundle, tmp_path, tamper, field):
    copy = tmp_path / "b"
    shutil.copytree(bf16_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    tamper(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as err:
        runtime.load(copy)
    assert err.value.field == field


# ---------------------------------------------------------------------------------------------------
# The compile side: the engine search's table, and its winners written as variants


@pytest.mark.slow
def test_int8_compile_carries_the_faster_openvino_variant(tiny, tmp_path, monkeypatch):
    """Timing is the search's input: made to favour OpenVINO here, so that what is checked is what compile
    does with a winner (written, hashed, recorded with its needs, loaded by the runtime, judged by parity)."""
    pytest.importorskip("nncf")
    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig
    from edgemm.parity import latency
    from edgemm.parity.latency import LatencyStats

    def fake_timing(fns, **kwargs):
        ms = {"onnxruntime-fp32": 10.0, "onnxruntime-int8": 6.0, "openvino-fp32": 9.0, "openvino-bf16": 3.0,
              "openvino-int8": 4.0, "openvino-int8-bf16": 3.5}
        return {name: LatencyStats(ms.get(name.removesuffix("-guarded"), 8.0), 0, 0, 0, 5) for name in fns}

    monkeypatch.setattr(latency, "measure_interleaved_within", fake_timing)
    monkeypatch.setattr(hostinfo, "host_isa", lambda text=None: SAPPHIRE_RAPIDS)
    out = tmp_path / "b"
    logs = []
    compile_model(CompileConfig(model=str(tiny["torchscript"]), output=str(out), calib=str(tiny["calib"]),
                                precision="int8", tune_threads=False, min_cosine=0.98), say=logs.append)
    manifest = json.loads((out / "manifest.json").read_text())
    table = {r["name"]: r for r in manifest["precision"]["recipe"]["engines"]["table"]}
    assert {"onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16"} <= set(table)
    assert table["openvino-bf16"]["p50_ratio"] == {"1": 0.3, "8": 0.3}
    names = [v["name"] for v in manifest["variants"]]
    assert names[0] == "openvino-bf16"
    assert names[-1] == "onnxruntime-int8" and manifest["variants"][-1]["backend"] == manifest["backend"]
    first = manifest["variants"][0]
    assert first["backend"]["name"] == "openvino" and first["requires_any"] == BF16
    assert first["backend"]["model"] in manifest["files"] and first["backend"]["weights"] in manifest["files"]
    assert any("CPU engine candidates" in line for line in logs)
    judged = json.loads((out / "report.json").read_text())["bundle"]
    assert judged["variant"] == "openvino-bf16" and judged["backend"] == "openvino"   # what the gate ran
    report_md = (out / "report.md").read_text()
    assert "## CPU engines" in report_md and "| openvino-bf16 | amx_bf16, avx512_bf16 | 0.300 | 0.300 |" in report_md
    # On this (patched) AMX host the runtime runs the fastest variant; with every feature hidden, the fallback.
    assert runtime.load(out).variant == "openvino-bf16"
    monkeypatch.setattr(hostinfo, "host_isa", lambda text=None: frozenset())
    assert runtime.load(out).variant == "onnxruntime-int8"


def test_int8_candidates_are_skipped_when_openvino_float_is_far_behind(tiny_bundle, monkeypatch):
    """Small models: OpenVINO's per-call overhead (6-18x ORT on the zoo's dual-encoder) is more than INT8
    recovers, so the NNCF builds are skipped, and said so in the table."""
    pytest.importorskip("nncf")
    from edgemm.parity import latency
    from edgemm.parity.latency import LatencyStats
    from edgemm.quant import cpu_engines

    def fake_timing(fns, **kwargs):
        ms = {"onnxruntime-fp32": 10.0, "onnxruntime-int8": 6.0, "openvino-fp32": 40.0, "openvino-bf16": 30.0}
        return {name: LatencyStats(ms[name], 0, 0, 0, 5) for name in fns}

    def no_nncf(*args, **kwargs):
        raise AssertionError("NNCF ran although OpenVINO float was 5x behind ORT INT8")

    monkeypatch.setattr(latency, "measure_interleaved_within", fake_timing)
    from edgemm.backends import openvino as ovb
    monkeypatch.setattr(ovb, "quantize_int8", no_nncf)
    data = make_data(8, seed=4)
    feeds = [{k: v[i:i + 1] for k, v in data.items()} for i in range(8)]
    model = tiny_bundle / "model.onnx"
    choice = cpu_engines.search_engines(model, model, {}, feeds, feeds, batches=(1, 8), min_cosine=0.99,
                                        isa=SAPPHIRE_RAPIDS, log=lambda m: None)
    rows = {r.name: r for r in choice.table}
    assert rows["openvino-int8"].status == rows["openvino-int8-bf16"].status == "skipped"
    assert "5.0x ORT INT8" in rows["openvino-int8"].note
    assert rows["openvino-bf16"].p50_ratio == {"1": 3.0, "8": 3.0}
    assert choice.variants == []      # nothing beat ORT INT8: the bundle stays single-variant


@pytest.mark.slow
def test_when_no_ort_int8_recipe_meets_the_bar_openvino_competes_with_fp32(tiny, tmp_path, monkeypatch):
    pytest.importorskip("nncf")
    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig
    from edgemm.errors import ParityError
    from edgemm.parity import latency
    from edgemm.parity.latency import LatencyStats
    from edgemm.quant import cpu_int8

    def no_recipe(*args, **kwargs):
        raise ParityError("no INT8 recipe reached min cosine 0.98 on every output (test)")

    def fake_timing(fns, **kwargs):
        ms = {"onnxruntime-fp32": 10.0, "openvino-fp32": 9.5, "openvino-bf16": 4.0}
        return {name: LatencyStats(ms.get(name.removesuffix("-guarded"), 20.0), 0, 0, 0, 5) for name in fns}

    monkeypatch.setattr(cpu_int8, "select_recipe", no_recipe)
    monkeypatch.setattr(latency, "measure_interleaved_within", fake_timing)
    monkeypatch.setattr(hostinfo, "host_isa", lambda text=None: SAPPHIRE_RAPIDS)
    out = tmp_path / "b"
    compile_model(CompileConfig(model=str(tiny["torchscript"]), output=str(out), calib=str(tiny["calib"]),
                                precision="int8", tune_threads=False, min_cosine=0.98), say=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == ["openvino-bf16", "onnxruntime-fp32"]
    assert manifest["precision"]["recipe"]["name"] == "fp32"
    assert any("fallback is FP32" in n for n in manifest["precision"]["notes"])
    # Without an OpenVINO candidate faster than FP32 under the bar, the compile fails as before.
    monkeypatch.setattr(latency, "measure_interleaved_within",
                        lambda fns, **kw: {n: LatencyStats(10.0 if n == "onnxruntime-fp32" else 12.0, 0, 0, 0, 5)
                                           for n in fns})
    with pytest.raises(ParityError, match="no INT8 recipe"):
        compile_model(CompileConfig(model=str(tiny["torchscript"]), output=str(tmp_path / "c"),
                                    calib=str(tiny["calib"]), precision="int8", tune_threads=False,
                                    min_cosine=0.98), say=lambda m: None)


@pytest.mark.slow
def test_engine_table_has_the_task_metric_when_eval_is_labelled(tmp_path, cli):
    pytest.importorskip("nncf")
    res = cli("example", "dual-encoder", "-o", tmp_path / "de")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "b"
    res = cli("compile", tmp_path / "de" / "model.pt", "--int8", "--calib", tmp_path / "de" / "calib.npz",
              "--eval", tmp_path / "de" / "eval.npz", "-o", out, "--no-thread-tuning")
    assert res.returncode == 0, res.stderr
    assert "| task metric |" in res.stdout
    table = json.loads((out / "manifest.json").read_text())["precision"]["recipe"]["engines"]["table"]
    scored = {r["name"]: r["task_metric"] for r in table if r.get("task_metric") is not None}
    # recall@1 on 128 labelled --eval samples, for the reference and every candidate that ran
    assert {"onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32"} <= set(scored)
    assert all(0 <= v <= 100 for v in scored.values()) and scored["onnxruntime-fp32"] > 90
    assert "| task metric |" in (out / "report.md").read_text()


def _flip_top1(logits: np.ndarray, rows) -> np.ndarray:
    """``logits`` with the runner-up of each row in ``rows`` raised just above its winner."""
    out = np.array(logits, copy=True)
    flat = out.reshape(-1, out.shape[-1])
    for i in rows:
        first, second = np.argsort(flat[i])[-1], np.argsort(flat[i])[-2]
        flat[i, second] = flat[i, first] + 1e-3 * abs(flat[i, first])
    return out


def test_engine_candidates_are_judged_by_verifys_metrics_not_cosine_alone(tiny_bundle, monkeypatch):
    """An OpenVINO candidate whose class scores keep FP32's cosine but not its top-1 is inaccurate in the
    engine table (cosine-only judging passed it), with verify's own failure line."""
    pytest.importorskip("nncf")
    from edgemm.backends import openvino as ovb
    from edgemm.parity import latency
    from edgemm.parity.latency import LatencyStats
    from edgemm.parity.metrics import per_sample_cosine
    from edgemm.quant import cpu_engines

    real_compile = ovb.compile_for_timing

    class FlippedRequest:
        def __init__(self, request):
            self.request = request

        def infer(self, feed):   # flips the one sample with the closest-run top-2, whatever the call size
            outputs = [np.array(o) for o in self.request.infer(feed).to_tuple()]
            outputs[0] = _flip_top1(outputs[0], np.flatnonzero(feed["image"][:, 0, 0, 0] == target))
            return type("Result", (), {"to_tuple": lambda self_: tuple(outputs)})()

    class Flipped:
        def __init__(self, compiled):
            self.compiled = compiled

        def create_infer_request(self):
            return FlippedRequest(self.compiled.create_infer_request())

    monkeypatch.setattr(ovb, "compile_for_timing", lambda model, hint, threads=0: Flipped(real_compile(model, hint)))
    monkeypatch.setattr(latency, "measure_interleaved_within",
                        lambda fns, **kw: {n: LatencyStats(5.0 if n.startswith("openvino") else 10.0, 0, 0, 0, 5)
                                           for n in fns})
    data = make_data(16, seed=4)
    feeds = [{k: v[i:i + 1] for k, v in data.items()} for i in range(16)]
    model = tiny_bundle / "model.onnx"
    import onnxruntime as ort

    logits = ort.InferenceSession(str(model)).run(None, data)[0]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    closest = int(np.argmin(top2[:, 1] - top2[:, 0]))
    target = data["image"][closest, 0, 0, 0]
    flipped = _flip_top1(logits, [closest])
    assert (flipped.argmax(-1) != logits.argmax(-1)).sum() == 1
    assert per_sample_cosine(logits, flipped).mean() > 0.99   # cosine alone passes it
    choice = cpu_engines.search_engines(model, model, {}, feeds, feeds, batches=(1,), min_cosine=0.99,
                                        isa=HASWELL, log=lambda m: None)
    row = {r.name: r for r in choice.table}["openvino-fp32"]
    assert row.status == "inaccurate" and row.min_cosine > 0.99, row
    assert row.agreement["logits"]["top1"] == 15 / 16
    assert "output logits: top-1 agreement 0.9375 < 0.95" in row.note   # verify's failure line, the INT8 bar
    assert choice.variants == []    # the faster but inaccurate candidate is not carried


def test_guarded_int8_rungs_keep_more_outlier_matmuls_float_while_the_bar_is_missed(tiny_bundle, monkeypatch):
    """Plain NNCF INT8 misses the bar -> guarded rungs: the outlier-ranked MatMuls (1, 2, 4 ...) and the output
    projections kept float, SmoothQuant at GUARDED_SQ_ALPHA; at most GUARDED_RUNGS builds after the plain one."""
    pytest.importorskip("nncf")
    from edgemm.backends import openvino as ovb
    from edgemm.quant import cpu_engines

    built = []
    real = ovb.quantize_int8

    def spy(model, feeds, *, ignored=(), smooth_quant_alpha=None):
        built.append((len(ignored), smooth_quant_alpha))
        return real(model, feeds, ignored=ignored, smooth_quant_alpha=smooth_quant_alpha)

    monkeypatch.setattr(ovb, "quantize_int8", spy)
    model, feeds = _untimed_search_inputs(tiny_bundle, monkeypatch)
    ranked, heads = cpu_engines._outlier_ranking(model, feeds)
    assert len(ranked) == 2 and heads   # the tiny model's qkv and out projections
    # A bar no quantized model meets: every rung is built, and no more.
    choice = cpu_engines.search_engines(model, model, {}, feeds, feeds, batches=(1,), min_cosine=1.0, isa=HASWELL,
                                        log=lambda m: None)
    rows = {r.name: r for r in choice.table}
    assert [r.name for r in choice.table if r.name.startswith("openvino-int8")] == [
        "openvino-int8", "openvino-int8-guarded"]   # a second rung would keep no more nodes (out is a head)
    guarded = rows["openvino-int8-guarded"]
    assert guarded.ignored_nodes == len(cpu_engines._guarded_nodes(ranked, heads, 1)) and guarded.status == "inaccurate"
    assert [alpha for _, alpha in built] == [None, cpu_engines.GUARDED_SQ_ALPHA]   # one NNCF build per rung
    assert built[0][0] == 0 and built[1][0] >= guarded.ignored_nodes   # (+ the outputs' friendly names)
    # The doubling on a BERT-like ranking (MiniLM: 4 FFN down-projections past 50): 4, 8, 16 MatMuls.
    bert = [(f"m{i}", r) for i, r in enumerate([96, 95, 84, 61, 43, 43, 39, 38, 36, 32, 29, 19, 19, 19, 9, 8, 7, 5])]
    assert [cpu_engines._guarded_count(bert, rung) for rung in range(cpu_engines.GUARDED_RUNGS)] == [4, 8, 16]
    assert cpu_engines._guarded_count(bert[:6], 2) == 6 and cpu_engines._guarded_count([("x", 3.0)], 0) == 1


def test_a_failing_outlier_probe_costs_the_guarded_rungs_not_the_compile(tiny_bundle, monkeypatch):
    pytest.importorskip("nncf")
    from edgemm.quant import cpu_engines

    def broken(*args, **kwargs):
        raise RuntimeError("probe cannot augment this graph")

    monkeypatch.setattr(cpu_engines, "_outlier_ranking", broken)
    model, feeds = _untimed_search_inputs(tiny_bundle, monkeypatch)
    logs = []
    choice = cpu_engines.search_engines(model, model, {}, feeds, feeds, batches=(1,), min_cosine=1.0, isa=HASWELL,
                                        log=logs.append)
    assert [r.name for r in choice.table if r.name.startswith("openvino-int8")] == ["openvino-int8"]
    assert any("guarded INT8 not built: outlier probe failed (RuntimeError" in line for line in logs)


def _untimed_search_inputs(tiny_bundle, monkeypatch):
    """The tiny bundle's ONNX model and 8 single-sample feeds, with every candidate timed equal (the
    tests judge which candidates are built, not their speed)."""
    from edgemm.parity import latency
    from edgemm.parity.latency import LatencyStats

    monkeypatch.setattr(latency, "measure_interleaved_within",
                        lambda fns, **kw: {n: LatencyStats(10.0, 0, 0, 0, 5) for n in fns})
    data = make_data(8, seed=4)
    return tiny_bundle / "model.onnx", [{k: v[i:i + 1] for k, v in data.items()} for i in range(8)]
