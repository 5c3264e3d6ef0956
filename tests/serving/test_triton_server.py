"""Bundles exported as a Triton model repository, served by a real tritonserver (2.51, python backend,
from the nvidia-pytriton wheel) on 127.0.0.1: outputs equal edgemm.runtime's, the dynamic batcher forms
batches, metrics count the requests, a bundle changed after export is refused at load, and the CLI's
export and serve work end to end. Skipped with the reason when no tritonserver is installed."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import edgemm.runtime as rt
from edgemm.errors import DependencyError, InputError
from edgemm.serving import TritonOptions, TritonServer, export_triton, find_tritonserver
from tests.conftest import ROOT

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
pytestmark = pytest.mark.skipif(find_tritonserver() is None,
                                reason="no tritonserver here (pip install --no-deps nvidia-pytriton)")

REQUEST_TIMEOUT_S = 60  # every request is bounded: a stuck server fails the test, never hangs it


def client(server):
    return httpclient.InferenceServerClient(server.http_url, connection_timeout=REQUEST_TIMEOUT_S,
                                            network_timeout=REQUEST_TIMEOUT_S)


def infer(server, model, feeds, outputs):
    inputs = []
    for name, value in feeds.items():
        tensor = httpclient.InferInput(name, list(value.shape), httpclient.np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    connection = client(server)
    try:
        result = connection.infer(model, inputs)
    finally:
        connection.close()  # an open keep-alive connection holds the server's shutdown for its exit timeout
    return {name: result.as_numpy(name) for name in outputs}


def samples(bundle, data, start, count):
    return {s.name: np.ascontiguousarray(data[s.name][start:start + count]) for s in bundle.inputs}


def metric(server, name, model):
    pattern = re.compile(rf'^{name}{{model="{re.escape(model)}",version="1"}} (\S+)$', re.M)
    found = pattern.search(server.metrics())
    return float(found.group(1)) if found else None


@pytest.fixture(scope="module")
def tiny_repo(tiny_bundle, tmp_path_factory):
    return export_triton([tiny_bundle], tmp_path_factory.mktemp("repo") / "repository",
                         TritonOptions(max_queue_delay_us=1000), say=lambda m: None)


def test_served_outputs_equal_the_runtime_and_metrics_count(tiny_repo, tiny_bundle, tiny, tmp_path):
    """The cheap real-server check (default tier): batch 1 and batch 3 bit-exact, stats and metrics."""
    bundle = rt.load(tiny_bundle)
    data = np.load(tiny["eval"])
    outputs = [s.name for s in bundle.outputs]
    name = tiny_bundle.name
    with TritonServer(tiny_repo, workdir=tmp_path / "work") as server:
        assert server.ready(name)
        sent = 0
        for start, count in ((0, 1), (1, 3), (4, 1)):
            feeds = samples(bundle, data, start, count)
            got = infer(server, name, feeds, outputs)
            sent += 1
            expected = bundle.run(feeds)
            for key in outputs:  # one request at a time: the server ran exactly this batch, as we do
                assert got[key].dtype == expected[key].dtype and np.array_equal(got[key], expected[key]), key
        stats = server.statistics(name)
        assert stats["inference_count"] == 5 and stats["execution_count"] == 3
        assert metric(server, "nv_inference_request_success", name) == sent
        # a request the bundle refuses (batch above nothing, wrong dtype) comes back as an error, one line
        bad = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in samples(bundle, data, 0, 1).items()}
        with pytest.raises(Exception, match="(?i)data_type|dtype|FP64"):
            infer(server, name, bad, outputs)
        assert metric(server, "nv_inference_request_success", name) == sent


def test_a_bad_request_fails_alone_when_merged_with_good_ones(tiny_bundle, tiny, tmp_path):
    """The dynamic batcher merges requests into one bundle call; a request the runtime refuses (NaN) gets
    its one-line error and the requests merged with it still get their answers."""
    bundle = rt.load(tiny_bundle)
    data = np.load(tiny["eval"])
    outputs = [s.name for s in bundle.outputs]
    # The batcher holds the first request up to 2 s for others: six threads on a loaded 2-core host (CI)
    # have sent theirs by then, so the merge checked below does not depend on scheduling luck.
    repo = export_triton([tiny_bundle], tmp_path / "repository", TritonOptions(max_queue_delay_us=2_000_000),
                         say=lambda m: None)
    good = [samples(bundle, data, i, 1) for i in range(5)]
    bad = {k: v.copy() for k, v in samples(bundle, data, 5, 1).items()}
    floats = next(k for k, v in bad.items() if v.dtype.kind == "f")
    bad[floats].flat[0] = np.nan
    with TritonServer(repo, workdir=tmp_path / "work") as server:
        def send(feeds):
            try:
                return infer(server, tiny_bundle.name, feeds, outputs)
            except Exception as exc:
                return exc
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(send, good + [bad], timeout=120))
        assert server.statistics(tiny_bundle.name)["execution_count"] < 6   # requests were merged
    for feeds, got in zip(good, answers):
        assert not isinstance(got, Exception), got
        for key, value in bundle.run(feeds).items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5)
    assert isinstance(answers[-1], Exception) and "NaN" in str(answers[-1])


def test_bundle_changed_after_export_is_refused_at_load(tiny_repo, tiny_bundle, tmp_path):
    import shutil

    repo = tmp_path / "repository"
    shutil.copytree(tiny_repo, repo)
    name = tiny_bundle.name
    model = repo / name / "1" / "bundle" / "model.onnx"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model.write_bytes(bytes(raw))
    with TritonServer(repo, workdir=tmp_path / "work", exit_on_error=False) as server:
        state = {m["name"]: m for m in server.models()}[name]
        assert state["state"] == "UNAVAILABLE" and "does not match its sha256" in state.get("reason", "")
        assert not server.ready(name)


def test_a_picked_port_taken_meanwhile_is_picked_again(tiny_repo, tmp_path, monkeypatch):
    """Ports are picked free, then bound by tritonserver a moment later: another process may take one in
    between (CI hosts run other jobs). The server then starts on fresh ports instead of failing the test."""
    import socket

    from edgemm.serving import tritonserver

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        real, calls = tritonserver.free_ports, []

        def first_one_taken(count):
            calls.append(count)
            return [port, *real(count - 1)] if len(calls) == 1 else real(count)

        monkeypatch.setattr(tritonserver, "free_ports", first_one_taken)
        with TritonServer(tiny_repo, workdir=tmp_path / "work") as server:
            assert server.http_port != port and server.ready(tiny_repo.iterdir().__next__().name)
        assert len(calls) == 2
        # a port the caller gave is the caller's choice: no second try
        with pytest.raises(DependencyError, match="already in use"):
            TritonServer(tiny_repo, workdir=tmp_path / "work2", http_port=port).start()


def test_free_ports_differ():
    from edgemm.serving.tritonserver import free_ports

    assert len(set(free_ports(3))) == 3


def test_monitor_figures_are_triton_metrics(tiny_bundle, tiny, tmp_path):
    """--monitor: the runtime monitor's input checks reach Triton's /metrics (custom metric families)."""
    bundle = rt.load(tiny_bundle, monitor=True)
    if bundle.stats()["drift"] != "known":
        pytest.skip("this bundle carries no calibration profile")
    repo = export_triton([tiny_bundle], tmp_path / "repository", TritonOptions(monitor=True), say=lambda m: None)
    data = np.load(tiny["eval"])
    name = tiny_bundle.name
    normal = samples(bundle, data, 0, 2)
    wild = {k: (v * 1000 if v.dtype.kind == "f" else v) for k, v in samples(bundle, data, 2, 1).items()}
    outputs = [s.name for s in bundle.outputs]
    with TritonServer(repo, workdir=tmp_path / "work") as server:
        infer(server, name, normal, outputs)
        infer(server, name, wild, outputs)
        for feeds in (normal, wild):
            bundle.run(feeds)   # the same checks in-process: what the server must report
        expected = bundle.stats()["inputs"]
        text = server.metrics()
    for input_name, figures in expected.items():
        for family, key in (("edgemm_input_values_total", "values"), ("edgemm_input_out_of_range_total", "out_of_range")):
            found = re.search(rf'^{family}{{[^}}]*input="{re.escape(input_name)}"[^}}]*}} (\S+)$', text, re.M)
            assert found, (family, input_name)
            assert float(found.group(1)) == (figures[key] or 0), (family, input_name)
    assert any(f["out_of_range"] for f in expected.values())  # the wild request was seen as such


def test_signed_bundle_needs_the_trusted_key_on_the_server(tiny_bundle, tmp_path, monkeypatch):
    """Exported with --require-signature: the served model loads only when the server trusts the key
    (EDGEMM_TRUSTED_KEYS in its environment); without it the model is not ready."""
    import shutil

    pytest.importorskip("model_signing", reason="edgemm[sign] is not installed")
    from edgemm.runtime.signing import generate_key_pair, sign_bundle

    monkeypatch.delenv("EDGEMM_TRUSTED_KEYS", raising=False)   # the server inherits this environment
    signed = tmp_path / "signed-tiny"
    shutil.copytree(tiny_bundle, signed)
    private, public, _ = generate_key_pair(tmp_path / "keys")
    sign_bundle(signed, private)
    repo = export_triton([signed], tmp_path / "repository", TritonOptions(require_signature=True),
                         trusted_keys=[public], say=lambda m: None)
    assert 'key: "edgemm.require_signature"' in (repo / "signed-tiny" / "config.pbtxt").read_text()
    with TritonServer(repo, workdir=tmp_path / "w1", exit_on_error=False,
                      env={"EDGEMM_TRUSTED_KEYS": str(public)}) as server:
        assert server.ready("signed-tiny")
    with TritonServer(repo, workdir=tmp_path / "w2", exit_on_error=False) as server:   # no key trusted
        state = {m["name"]: m for m in server.models()}["signed-tiny"]
        assert state["state"] == "UNAVAILABLE" and "signature" in state.get("reason", "").lower(), state
    with pytest.raises(InputError, match="--require-signature"):
        export_triton([signed], tmp_path / "r2", TritonOptions(require_signature=True), say=lambda m: None)


def test_native_flavor_repository_against_the_schema(tiny_bundle, tmp_path):
    """--flavor native: config.pbtxt parses as Triton's ModelConfig and the version folder holds the
    bundle's own model bytes (not run: the wheel's server has no ONNX Runtime backend)."""
    from google.protobuf import text_format

    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    repo = export_triton([tiny_bundle], tmp_path / "repository", TritonOptions(flavor="native"), say=lambda m: None)
    msg = text_format.Parse((repo / tiny_bundle.name / "config.pbtxt").read_text(), mc.ModelConfig())
    assert msg.platform == "onnxruntime_onnx" and msg.max_batch_size > 0
    model = repo / tiny_bundle.name / "1" / msg.default_model_filename
    assert model.read_bytes() == (tiny_bundle / msg.default_model_filename).read_bytes()
    assert sorted(p.name for p in model.parent.iterdir()) == sorted(rt.load(tiny_bundle).manifest["files"])


# ---- the zoo, FP32 and INT8, under concurrent load (slow: compiles three bundles, serves ~300 requests)

def _zoo_bundle(cli, folder, name, served_as, *flags):
    ex = folder / f"{name}-data"
    if not ex.exists():
        res = cli("example", name, "-o", ex)
        assert res.returncode == 0, res.stderr
    out = folder / served_as  # the folder's name is the served model's name
    res = cli("compile", ex / "model.pt2", "--calib", ex / "calib.npz", "-o", out, *flags)
    assert res.returncode == 0, res.stderr
    return out, ex / "eval.npz"


@pytest.fixture(scope="module")
def zoo_bundles(tmp_path_factory):
    from tests.conftest import run_cli

    folder = tmp_path_factory.mktemp("zoo")
    return {"vqa-fp32": _zoo_bundle(run_cli, folder, "cross-attention", "vqa-fp32"),
            "vqa-int8": _zoo_bundle(run_cli, folder, "cross-attention", "vqa-int8", "--int8",
                                     "--int8-recipe", "dynamic_per_channel"),  # pinned: the search may pick static
            "clip-int8": _zoo_bundle(run_cli, folder, "dual-encoder", "clip-int8", "--int8")}


@pytest.mark.slow
def test_zoo_bundles_under_concurrent_mixed_batches(zoo_bundles, tmp_path):
    """FP32 and INT8 bundles in one repository; 16 clients send batch 1..4 requests at once.
    - FP32 cross-attention: the dynamic batcher must form batches (executions < requests); answers match the
      runtime to float rounding (ONNX Runtime's kernels may round a row differently at another batch size);
    - dynamic INT8 (one activation scale per batch) and the CLIP-style [batch, batch] similarity must never
      be merged with other requests: every answer bit-exact, one execution per request;
    and the metrics count every request."""
    from edgemm.serving.triton_repo import rows_mix

    sources = [path for path, _ in zoo_bundles.values()]
    assert rows_mix(zoo_bundles["vqa-int8"][0], rt.load(zoo_bundles["vqa-int8"][0]).manifest)
    notes = []
    repo = export_triton(sources, tmp_path / "repository", TritonOptions(max_queue_delay_us=20000, instances=1),
                         say=notes.append)
    # merged by the dynamic batcher: batchable bundles without dynamic INT8 (clip-int8 may get either recipe)
    merged = {m for m, (path, _) in zoo_bundles.items() if m != "clip-int8" and not rows_mix(path, rt.load(path).manifest)}
    assert merged == {"vqa-fp32"}
    for model in zoo_bundles:
        config = (repo / model / "config.pbtxt").read_text()
        assert ("dynamic_batching" in config) == (model in merged), model
    assert "max_batch_size: 0" in (repo / "clip-int8" / "config.pbtxt").read_text()
    assert any("vqa-int8" in n and "dynamic INT8" in n for n in notes) and any("clip-int8" in n for n in notes)
    rng = np.random.default_rng(0)
    jobs = []
    for model, (path, data_path) in zoo_bundles.items():
        bundle, data = rt.load(path), np.load(data_path)
        for _ in range(48):
            count = int(rng.integers(1, 5))
            start = int(rng.integers(0, len(data["image"]) - count))
            jobs.append((model, bundle, samples(bundle, data, start, count)))
    rng.shuffle(jobs)

    with TritonServer(repo, workdir=tmp_path / "work") as server:
        def send(job):
            model, bundle, feeds = job
            return infer(server, model, feeds, [s.name for s in bundle.outputs])

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, jobs, timeout=600))
        for (model, bundle, feeds), got in zip(jobs, answers):
            expected = bundle.run(feeds)
            for key, value in expected.items():
                assert got[key].shape == value.shape and got[key].dtype == value.dtype, (model, key)
                if model in merged:
                    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=f"{model} {key}")
                else:
                    assert np.array_equal(got[key], value), (model, key)
        for model in zoo_bundles:
            stats = server.statistics(model)
            sent = sum(1 for job in jobs if job[0] == model)
            assert metric(server, "nv_inference_request_success", model) == sent
            batched = model != "clip-int8"  # max_batch_size 0: Triton counts a request as one inference
            assert stats["inference_count"] == sum(len(next(iter(j[2].values()))) if batched else 1
                                                   for j in jobs if j[0] == model)
            if model in merged:
                assert stats["execution_count"] < sent, (model, stats["execution_count"], sent)  # batches formed
            else:
                assert stats["execution_count"] == sent, model


@pytest.fixture(scope="module")
def split_bundle(zoo_bundles):
    from tests.conftest import run_cli

    folder = zoo_bundles["vqa-fp32"][0].parent
    return _zoo_bundle(run_cli, folder, "cross-attention", "vqa-split", "--split", "--no-thread-tuning")


@pytest.mark.slow
def test_split_bundle_served_as_an_ensemble(split_bundle, tmp_path):
    """A split bundle (vision, text, fusion parts) becomes a Triton ensemble: requests to the ensemble
    return the split bundle's outputs (bit-exact one at a time; to float rounding when merged), and every
    part model executes."""
    path, data_path = split_bundle
    bundle, data = rt.load(path), np.load(data_path)
    repo = export_triton([path], tmp_path / "repository", TritonOptions(max_queue_delay_us=5000), say=lambda m: None)
    parts = ["vqa-split.vision", "vqa-split.text", "vqa-split.fusion"]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(["vqa-split", *parts])
    outputs = [s.name for s in bundle.outputs]
    with TritonServer(repo, workdir=tmp_path / "work") as server:
        for start, count in ((0, 1), (1, 3)):
            feeds = samples(bundle, data, start, count)
            got = infer(server, "vqa-split", feeds, outputs)
            for key, value in bundle.run(feeds).items():
                assert np.array_equal(got[key], value), key
        jobs = [samples(bundle, data, i, 1 + i % 3) for i in range(40)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda f: infer(server, "vqa-split", f, outputs), jobs, timeout=600))
        for feeds, got in zip(jobs, answers):
            for key, value in bundle.run(feeds).items():
                np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5)
        assert metric(server, "nv_inference_request_success", "vqa-split") == 42
        for part in parts:
            stats = server.statistics(part)
            assert stats["inference_count"] == 1 + 3 + sum(len(f["image"]) for f in jobs), part
            assert 0 < stats["execution_count"] <= 42


# ---- the CLI: export, then serve until SIGTERM

def test_cli_export_refusals_and_force(cli, tiny_bundle, tmp_path):
    repo = tmp_path / "repository"
    res = cli("export", "triton", tiny_bundle, "-o", repo, "--preferred-batch", "4", "--max-queue-delay-us", "500")
    assert res.returncode == 0, res.stderr
    info = json.loads((repo / "edgemm-triton.json").read_text())
    assert list(info["models"]) == [tiny_bundle.name]
    assert (repo / tiny_bundle.name / "1" / "model.py").read_bytes() == \
        (ROOT / "edgemm" / "serving" / "triton_model.py").read_bytes()   # copied, not generated
    before = (repo / tiny_bundle.name / "config.pbtxt").read_text()
    res = cli("export", "triton", tiny_bundle, "-o", repo)
    assert res.returncode == 2 and "already exists" in res.stderr and "Traceback" not in res.stderr
    assert (repo / tiny_bundle.name / "config.pbtxt").read_text() == before
    res = cli("export", "triton", tiny_bundle, "-o", repo, "--max-batch", "8", "--force")
    assert res.returncode == 0, res.stderr
    assert "max_batch_size: 8" in (repo / tiny_bundle.name / "config.pbtxt").read_text()
    # --force replaces only what this command wrote
    (repo / "notes.txt").write_text("mine")
    res = cli("export", "triton", tiny_bundle, "-o", repo, "--force")
    assert res.returncode == 2 and "notes.txt" in res.stderr and (repo / "notes.txt").exists()
    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    res = cli("export", "triton", tiny_bundle, "-o", other, "--force")
    assert res.returncode == 2 and (other / "keep.txt").read_text() == "x"
    # inside the bundle, or over it
    for target in (tiny_bundle / "repo", tiny_bundle):
        res = cli("export", "triton", tiny_bundle, "-o", target, "--force")
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    rt.load(tiny_bundle)  # untouched
    # a bundle already changed is refused before anything is written (never exported "as is")
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    with open(tampered / "model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    res = cli("export", "triton", tampered, "-o", tmp_path / "r3")
    assert res.returncode == 2 and "sha256" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r3").exists()
    res = cli("export", "triton", tiny_bundle, "-o", tmp_path / "r2", "--max-batch", "65")
    assert res.returncode == 2 and "--max-batch" in res.stderr and not (tmp_path / "r2").exists()


def test_cli_serve_until_sigterm(tiny_bundle, tiny, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", "from edgemm.cli.main import entry; entry()", "serve",
                             str(tiny_bundle)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(line.startswith("(Ctrl-C") for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        url = next(line.split()[1] for line in lines if line.strip().startswith("http "))
        host = url.split("/")[2]
        assert host.startswith("127.0.0.1:")
        bundle = rt.load(tiny_bundle)
        feeds = samples(bundle, np.load(tiny["eval"]), 0, 2)
        c = httpclient.InferenceServerClient(host, network_timeout=REQUEST_TIMEOUT_S)
        inputs = []
        for name, value in feeds.items():
            t = httpclient.InferInput(name, list(value.shape), httpclient.np_to_triton_dtype(value.dtype))
            t.set_data_from_numpy(value)
            inputs.append(t)
        got = c.infer(tiny_bundle.name, inputs)
        c.close()
        for key, value in bundle.run(feeds).items():
            assert np.array_equal(got.as_numpy(key), value)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert not list(tmp_path.glob("edgemm-serve-*"))  # its temporary repository is gone
    with pytest.raises(Exception):
        httpclient.InferenceServerClient(host, connection_timeout=2, network_timeout=2).is_server_live()


@pytest.mark.slow   # a split compile and a server start: ~60 s on the shared 2 cores
def test_a_monitored_split_ensemble_checks_its_inputs_in_the_towers(tmp_path):
    """--monitor on a split bundle: every part loads (the fusion part unmonitored), the ensemble answers
    as the runtime does, and each tower publishes the input checks of the model inputs it reads."""
    from tests.conftest import run_cli

    path, data_path = _zoo_bundle(run_cli, tmp_path, "cross-attention", "vqa-mon", "--split", "--no-thread-tuning")
    bundle = rt.load(path, monitor=True)
    repo = export_triton([path], tmp_path / "repository", TritonOptions(monitor=True), say=lambda m: None)
    feeds = samples(bundle, np.load(data_path), 0, 2)
    outputs = [s.name for s in bundle.outputs]
    with TritonServer(repo, workdir=tmp_path / "work") as server:
        got = infer(server, "vqa-mon", feeds, outputs)
        text = server.metrics()
    expected = bundle.run(feeds)
    assert all(np.array_equal(got[k], expected[k]) for k in outputs)
    for part, input_name in (("vision", "image"), ("text", "input_ids")):
        found = re.search(rf'^edgemm_input_values_total{{input="{input_name}",model="vqa-mon.{part}"[^}}]*}} (\S+)$',
                          text, re.M)
        assert found and float(found.group(1)) == bundle.stats()["inputs"][input_name]["values"], (part, text)
    assert 'model="vqa-mon.fusion"' not in "\n".join(l for l in text.splitlines() if l.startswith("edgemm_"))
