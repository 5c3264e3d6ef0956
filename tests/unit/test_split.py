"""Split compile (``--split``): one model per modality branch + the fusion head, run as a pipeline.

Split bundles must return what the unsplit bundle returns (FP32: max abs error <= 1e-4), run one branch
alone, reuse a branch's outputs (its feeds then omitted), cache branch outputs (bounded, counted), refuse
early fusion, and carry one engine build per part with its placement for TensorRT targets."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from edgemm.pipeline import compile_model  # noqa: E402
from edgemm.config import CompileConfig  # noqa: E402
from edgemm.errors import InputError  # noqa: E402
from edgemm import runtime as rt  # noqa: E402
from edgemm.runtime.pipeline import BranchCache  # noqa: E402

QUIET = dict(say=lambda m: None)


def _compile(model, out, **kw):
    kw.setdefault("tune_threads", False)
    return compile_model(CompileConfig(model=str(model), output=str(out), force=True, **kw), **QUIET)


@pytest.fixture(scope="module")
def zoo_examples(tmp_path_factory):
    from edgemm.zoo import write_example

    root = tmp_path_factory.mktemp("zoo-split")
    return {name: write_example(name, root / name) for name in ("dual-encoder", "cross-attention")}


@pytest.fixture(scope="module")
def dual(zoo_examples, tmp_path_factory):
    ex = zoo_examples["dual-encoder"]
    root = tmp_path_factory.mktemp("dual")
    names = "image_embeds,text_embeds,logits_per_image"
    split = _compile(ex["exported_program"], root / "split", calib=str(ex["calib"]), split=True, output_names=names)
    whole = _compile(ex["exported_program"], root / "whole", calib=str(ex["calib"]), output_names=names)
    data = dict(np.load(ex["eval"]))
    return {"split": split.bundle, "whole": whole.bundle, "manifest": split.manifest,
            "feeds": {"image": data["image"][:8], "input_ids": data["input_ids"][:8]}}


def _max_err(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_split_dual_encoder_equals_the_unsplit_bundle(dual):
    split, whole = rt.load(dual["split"]), rt.load(dual["whole"])
    assert isinstance(split, rt.PipelineBundle) and not isinstance(whole, rt.PipelineBundle)
    assert split.parts == ["vision", "text", "fusion"]
    assert _max_err(split.run(dual["feeds"]), whole.run(dual["feeds"])) <= 1e-4
    pipeline = dual["manifest"]["pipeline"]
    assert [p["name"] for p in pipeline["parts"]] == pipeline["order"] == ["vision", "text", "fusion"]
    fusion = pipeline["parts"][2]
    assert fusion["after"] == ["vision", "text"]
    # The text tower sends its batch-first output; the transpose of logits = image @ text.T runs in fusion.
    assert [s["name"] for s in fusion["inputs"]] == ["vision.embeds", "text_embeds"]
    assert {i["name"]: (i["from"], i["to"], i["shape"]) for i in pipeline["interface"]} == {
        "vision.embeds": ("vision", ["fusion"], ["batch", 64]), "text_embeds": ("text", ["fusion"], ["batch", 64])}
    # Every part file is hashed like any bundle file.
    files = dual["manifest"]["files"]
    assert all(p["backend"]["model"] in files for p in pipeline["parts"])


def test_a_branch_runs_alone_and_is_reused(dual):
    split = rt.load(dual["split"])
    feeds = dual["feeds"]
    full = split.run(feeds)
    text = split.part("text").run({"input_ids": feeds["input_ids"]})
    assert set(text) == {"text_embeds"}   # a model output that is also the interface tensor
    np.testing.assert_array_equal(text["text_embeds"], full["text_embeds"])
    # The text feeds may be left out once its outputs are given.
    again = split.run({"image": feeds["image"]}, reuse={"text": text})
    assert _max_err(again, full) == 0.0
    # Zero-shot shape: one image against many cached prompts.
    prompts = split.part("text").run({"input_ids": np.concatenate([feeds["input_ids"]] * 3)})
    one = split.run({"image": feeds["image"][:1]}, reuse={"text": prompts})
    assert one["logits_per_image"].shape == (1, 24)
    np.testing.assert_allclose(one["logits_per_image"][0, :8], full["logits_per_image"][0], atol=1e-5)


def test_reuse_and_part_errors_are_one_line(dual):
    split = rt.load(dual["split"])
    feeds = dual["feeds"]
    with pytest.raises(InputError, match="missing 'input_ids'"):
        split.run({"image": feeds["image"]})
    with pytest.raises(InputError, match="no part 'audio'"):
        split.part("audio")
    with pytest.raises(InputError, match="lacks 'text_embeds'"):
        split.run({"image": feeds["image"]}, reuse={"text": {"embeds": feeds["image"]}})
    with pytest.raises(InputError, match="needs 'input_ids'"):
        split.part("text").run({"image": feeds["image"]})


def test_a_part_run_alone_checks_its_inputs_as_run_does(dual):
    """``part(name).run`` is no way around ``run``'s checks: a token id outside the embedding table (-1
    would silently read the last row) and NaN are refused in one line naming the input."""
    split = rt.load(dual["split"])
    rows = split.token_vocab["input_ids"]
    ids = dual["feeds"]["input_ids"]
    for bad in (-1, rows):
        with pytest.raises(InputError, match=f"input_ids: token id {bad} is outside"):
            split.part("text").run({"input_ids": np.full_like(ids, bad)})
        with pytest.raises(InputError, match=f"input_ids: token id {bad} is outside"):
            split.run({**dual["feeds"], "input_ids": np.full_like(ids, bad)})
    image = dual["feeds"]["image"].copy()
    image[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="image: contains NaN"):
        split.part("vision").run({"image": image})
    assert split.part("text").run({"input_ids": ids})   # in-range ids still run


def test_a_split_bundle_names_the_backend_running_its_parts_and_bench_names_its_flag(dual, cli):
    """verify's report named the backend "pipeline" where compile's said "onnxruntime"; `bench --reuse` of
    an unknown part blamed a field "part" instead of the flag."""
    assert rt.load(dual["split"]).backend == "onnxruntime"
    proc = cli("bench", dual["split"], "--reuse", "audio", "--iterations", "2", "--warmup", "0")
    assert proc.returncode == 2 and ": --reuse: no part 'audio' (fix: name a tower: vision, text)" in proc.stderr


def test_inspect_says_measured_only_when_compile_timed_the_pipeline(dual, cli):
    """The fixture compiles without thread tuning: nothing timed the parts, so inspect must not say it did
    (it printed '(measured at compile)' for every split bundle, TensorRT ones compiled without a GPU too)."""
    assert "concurrency_tuning" not in dual["manifest"]["pipeline"] or not dual["manifest"]["pipeline"]["concurrency_tuning"]
    proc = cli("inspect", dual["split"])
    assert proc.returncode == 0, proc.stderr
    assert "  split: 3 parts, independent ones run one after another (the default: not measured)" in proc.stdout
    assert "measured at compile" not in proc.stdout


def test_a_monitored_split_bundle_keeps_parts_reuse_and_cache(dual):
    """load(monitor=True) on a split bundle: monitored, and part()/reuse=/enable_cache still there."""
    split = rt.load(dual["split"], monitor=True)
    feeds = dual["feeds"]
    assert isinstance(split, rt.PipelineBundle) and split.parts == ["vision", "text", "fusion"]
    full = split.run(feeds)
    text = split.part("text").run({"input_ids": feeds["input_ids"]})
    assert _max_err(split.run({"image": feeds["image"]}, reuse={"text": text}), full) == 0.0
    split.enable_cache()
    split.run(feeds)
    stats = split.stats()
    assert stats["calls"] == 3 and stats["errors"] == 0 and stats["batch_sizes"] == {8: 3}
    assert stats["inputs"]["input_ids"]["values"] == 2 * feeds["input_ids"].size   # not measured when reused


def test_branch_cache_counts_hits_and_is_thread_safe(dual):
    split = rt.load(dual["split"])
    cache = split.enable_cache(max_entries=8, max_bytes=1 << 20)
    feeds = dual["feeds"]
    first = split.run(feeds)
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 0   # vision and text
    errors = []

    def worker():
        for _ in range(20):
            if _max_err(split.run(feeds), first) != 0.0:
                errors.append("differs")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.stats()["hits"] == 2 * 4 * 20 and cache.stats()["entries"] == 2
    other = {k: v[:4] for k, v in feeds.items()}
    split.run(other)
    assert cache.stats()["entries"] == 4 and cache.stats()["misses"] == 4


@pytest.mark.slow   # five CLI runs: ~45 s on the shared 2 cores
def test_verify_inspect_bench_understand_split_bundles(dual, zoo_examples, tmp_path, cli):
    ex = zoo_examples["dual-encoder"]
    proc = cli("verify", dual["split"], "--reference", ex["exported_program"], "--data", ex["eval"],
               "--iterations", "0", "--json", "--no-write")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    parts = report["split_parts"]
    assert list(parts) == ["vision", "text", "fusion"] and all(p["passed"] for p in parts.values())
    assert parts["vision"]["outputs"]["image_embeds"]["mean_cosine"] > 0.9999
    assert parts["text"]["inputs"] == ["input_ids"]   # run without the image
    assert all(p["max_diff_vs_pipeline"] <= 1e-6 for p in parts.values())
    assert report["outputs"]["logits_per_image"]["max_abs_error"] <= 1e-4
    proc = cli("inspect", dual["split"], "--json")
    assert proc.returncode == 0, proc.stderr
    pipe = json.loads(proc.stdout)["pipeline"]
    assert [p["name"] for p in pipe["parts"]] == ["vision", "text", "fusion"]
    assert pipe["parts"][2]["after"] == ["vision", "text"] and pipe["parts"][0]["ops"]["Conv"] == 1
    text = cli("inspect", dual["split"]).stdout
    assert "part fusion after vision, text: fp32 on cpu" in text
    proc = cli("bench", dual["split"], dual["whole"], "--reuse", "text", "--iterations", "5", "--warmup", "1",
               "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [r["name"] for r in json.loads(proc.stdout)["results"]]
    assert any(r.endswith("[text reused]") for r in rows) and len(rows) == 3
    proc = cli("bench", dual["split"], "--reuse", "fusion", "--iterations", "2")
    assert proc.returncode != 0 and "only a branch fed by the model's inputs" in proc.stderr


def test_zero_shot_with_cached_prompt_embeddings(dual, zoo_examples, tmp_path):
    """The README's example: prompts encoded once, each image classified against their cached embeddings."""
    from edgemm.zoo.prompts import write_prompts

    paths = write_prompts("dual-encoder", tmp_path)
    texts = paths["prompt_texts"].read_text().splitlines()
    prompts = np.load(paths["prompts"])
    assert len(texts) == len(prompts["input_ids"]) == 144 and texts[0] == "a red circle in the top left"
    bundle = rt.load(dual["split"])
    cached = bundle.part("text").run({"input_ids": prompts["input_ids"]})
    data = np.load(zoo_examples["dual-encoder"]["eval"])
    right = 0
    for image, label in zip(data["image"][:64], data["labels"][:64]):
        out = bundle.run({"image": image[None]}, reuse={"text": cached})
        right += int(prompts["labels"][out["logits_per_image"].argmax()] == label)
    assert right / 64 >= 0.85   # the trained zoo model; random weights would score ~1/144


def test_an_edited_pipeline_section_is_refused_in_one_line(dual, tmp_path):
    import shutil

    from edgemm.errors import BundleError

    for edit, match in ((lambda p: p["parts"][0].update(after=["fusion"]), "parts listed before it"),
                        (lambda p: p.update(version=9), "not supported"),
                        (lambda p: p["parts"][2]["inputs"][0].update(name="nowhere"), "no input or part it runs after"),
                        (lambda p: p["parts"].pop(2), "no part makes the output"),
                        # fusion no longer after vision: it would run beside it and miss its output
                        (lambda p: p["parts"][2].update(after=["text"]), "no input or part it runs after"),
                        # a part's tensor spec missing a field or with ranges not an object (fuzzing found
                        # KeyError/AttributeError from the sessions' feed checks)
                        (lambda p: p["parts"][0]["inputs"][0].pop("dtype"), r"parts\[0\]\.inputs\[0\]: malformed"),
                        (lambda p: p["parts"][1]["outputs"][0].pop("shape"), r"parts\[1\]\.outputs\[0\]: malformed"),
                        (lambda p: p["parts"][2]["inputs"][0].update(ranges=[1]), r"parts\[2\]\.inputs\[0\]: malformed"),
                        # refused by the part's own session: the error says which part (it read "backend.model")
                        (lambda p: p["parts"][2]["backend"].update(model="../../x.onnx"),
                         r"pipeline\.parts\[2\]\.backend\.model: file path '\.\./\.\./x\.onnx' escapes the bundle")):
        copy = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(dual["split"], copy)
        doc = json.loads((copy / "manifest.json").read_text())
        edit(doc["pipeline"])
        (copy / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(BundleError, match=match) as err:
            rt.load(copy)
        assert "\n" not in str(err.value) and "pipeline" in str(err.value)
    doc = json.loads((dual["split"] / "manifest.json").read_text())
    assert "pipeline" in doc["requires"]   # an edgemm that does not know the section refuses the bundle


def test_the_pipeline_runtime_is_torch_free(dual, tmp_path):
    import subprocess
    import sys

    np.savez(tmp_path / "in.npz", **dual["feeds"])
    code = ("import sys, numpy as np, edgemm.runtime as rt\n"
            f"b = rt.load({str(dual['split'])!r}); f = dict(np.load({str(tmp_path / 'in.npz')!r}))\n"
            "t = b.part('text').run({'input_ids': f['input_ids']}); b.enable_cache()\n"
            "b.run({'image': f['image']}, reuse={'text': t}); b.run(f)\n"
            "bad = [m for m in ('torch', 'onnx', 'edgemm.split', 'edgemm.pipeline') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env={**__import__("os").environ, "PYTHONPATH": str(
                              __import__("pathlib").Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr


def _param(pbtxt: str, key: str) -> str:
    import re

    found = re.search(r'key: "' + re.escape(key) + r'"\s*value \{\s*string_value: "([^"]*)"', pbtxt)
    return found.group(1) if found else None


def test_triton_export_counts_every_model_and_monitors_the_parts_reading_inputs(dual, tmp_path, cli, monkeypatch):
    """A split bundle is 4 Triton models (ensemble + 3 parts), and --monitor checks the model's inputs in the
    towers reading them (the parts' configs asked for no monitor, and the python model applied none)."""
    import sys
    import types

    repo = tmp_path / "repo"
    proc = cli("export", "triton", dual["split"], "-o", repo, "--monitor")
    assert proc.returncode == 0, proc.stderr
    assert "4 model(s) from 1 bundle(s)" in proc.stdout
    name = dual["split"].name
    monitored = {part: _param((repo / f"{name}.{part}" / "config.pbtxt").read_text(), "edgemm.monitor")
                 for part in ("vision", "text", "fusion")}
    assert monitored == {"vision": "true", "text": "true", "fusion": "false"}
    assert f"{name}.vision, {name}.text" in proc.stderr

    # The python model of the vision part, on a stand-in for Triton's python-backend module.
    families = []

    class Family:
        COUNTER = "counter"

        def __init__(self, name, description, kind):
            self.name, self.values = name, {}
            families.append(self)

        def Metric(self, labels):
            family, key = self, labels.get("input")

            class Metric:
                def increment(self, value):
                    family.values[key] = family.values.get(key, 0) + value
            return Metric()

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.SimpleNamespace(MetricFamily=Family))
    monkeypatch.delitem(sys.modules, "edgemm.serving.triton_model", raising=False)
    from edgemm.serving.triton_model import TritonPythonModel

    model = TritonPythonModel()
    config = {"max_batch_size": 8, "parameters": {"edgemm.part": {"string_value": "vision"},
                                                  "edgemm.monitor": {"string_value": "true"}}}
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / f"{name}.vision"),
                      "model_version": "1", "model_name": f"{name}.vision"})
    image = dual["feeds"]["image"][:2]
    out = model.runner.run({"image": image * 1000})   # far outside the calibration range
    np.testing.assert_array_equal(out["image_embeds"], rt.load(dual["split"]).part("vision").run(
        {"image": image * 1000})["image_embeds"])
    model.drift.publish(model.stats())
    figures = {f.name: f.values for f in families}
    assert figures["edgemm_input_values_total"] == {"image": image.size}
    assert figures["edgemm_input_out_of_range_total"]["image"] > 0
    # The fusion part of the same --monitor export asks for no monitor and loads without one.
    fusion = TritonPythonModel()
    config["parameters"] = {"edgemm.part": {"string_value": "fusion"}, "edgemm.monitor": {"string_value": "false"}}
    fusion.initialize({"model_config": json.dumps(config), "model_repository": str(repo / f"{name}.fusion"),
                       "model_version": "1", "model_name": f"{name}.fusion"})
    assert fusion.drift is None and fusion.runner.name == "fusion"


@pytest.mark.parametrize("monitor", [False, True])
def test_the_python_model_loads_every_part_of_a_split_bundle(dual, tmp_path, cli, monkeypatch, monitor):
    """Every part's python model loads and runs its part, monitored or not: the fusion part (never
    monitored: it reads interface tensors only) and any part exported without --monitor read a monitored
    part's input list they lack (AttributeError: every split bundle failed to load in `edgemm serve`)."""
    import sys
    import types

    repo = tmp_path / "repo"
    flags = ["--monitor"] if monitor else []
    proc = cli("export", "triton", dual["split"], "-o", repo, *flags)
    assert proc.returncode == 0, proc.stderr
    stand_in = types.SimpleNamespace(MetricFamily=type("Family", (), {
        "COUNTER": "counter", "__init__": lambda self, **kw: None,
        "Metric": lambda self, labels: types.SimpleNamespace(increment=lambda value: None)}))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
    monkeypatch.delitem(sys.modules, "edgemm.serving.triton_model", raising=False)
    from edgemm.serving.triton_model import TritonPythonModel

    name, split = dual["split"].name, rt.load(dual["split"])
    feeds = dict(dual["feeds"])
    for part in split.parts:   # in run order: each part's outputs feed the parts after it
        folder = repo / f"{name}.{part}"
        config = {"max_batch_size": 8, "parameters": {
            "edgemm.part": {"string_value": part},
            "edgemm.monitor": {"string_value": _param((folder / "config.pbtxt").read_text(), "edgemm.monitor")}}}
        model = TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "model_repository": str(folder),
                          "model_version": "1", "model_name": f"{name}.{part}"})
        part_feeds = {n: feeds[n] for n in model.input_names}
        out = model.runner.run(part_feeds)
        expected = split.part(part).run(part_feeds)
        assert out.keys() == expected.keys()
        for key in out:
            np.testing.assert_array_equal(out[key], expected[key])
        feeds.update(out)


def test_branch_cache_bounds():
    cache = BranchCache(max_entries=2, max_bytes=100)
    arr = np.zeros(10, np.float32)   # 40 bytes
    for k in "abc":
        cache.put(k, {"x": arr})
    assert cache.stats()["entries"] == 2 and cache.get("a") is None and cache.get("c") is not None
    cache.put("big", {"x": np.zeros(100, np.float32)})   # larger than the whole cache: never kept
    assert cache.get("big") is None and cache.stats()["bytes"] <= 100
    cache.put("d", {"x": arr})
    cache.put("e", {"x": arr})   # 3 x 40 bytes > 100: the least recently used goes
    assert cache.stats()["bytes"] <= 100
    held = cache.get("e")["x"]
    with pytest.raises(ValueError):
        held[0] = 1.0   # cached arrays are shared read-only
    with pytest.raises(InputError):
        BranchCache(max_entries=0)
    with pytest.raises(InputError, match=r"e\.g\. max_bytes=64 << 20"):   # a size that caches something
        BranchCache(max_bytes=0)
    assert BranchCache.key("text", {"a": arr}) != BranchCache.key("vision", {"a": arr})
    assert BranchCache.key("t", {"a": arr}) != BranchCache.key("t", {"a": arr.reshape(2, 5)})


@pytest.mark.slow
def test_split_cross_attention_through_the_cli(zoo_examples, tmp_path, cli):
    ex = zoo_examples["cross-attention"]
    out = tmp_path / "xattn-split"
    proc = cli("compile", ex["exported_program"], "--split", "--calib", ex["calib"], "-o", out,
               "--output-names", "logits")
    assert proc.returncode == 0, proc.stderr
    # The runtime settings were timed on the staged pipeline and recorded (threads, concurrency).
    doc = json.loads((out / "manifest.json").read_text())
    tuning = doc["pipeline"]["concurrency_tuning"]["p50_ms"]
    assert set(tuning["1"]) == {"sequential", "concurrent", "sequential, 1 thread", "concurrent, 1 thread"}
    assert doc["backend"]["intra_op_threads"] in (0, 1) and isinstance(doc["pipeline"]["concurrent"], bool)
    assert "runtime: parts" in proc.stdout
    whole = _compile(ex["exported_program"], tmp_path / "whole", calib=str(ex["calib"]), output_names="logits")
    split = rt.load(out)
    assert split.parts == ["vision", "text", "fusion"]
    fusion = split.part("fusion")
    assert fusion.after == ["vision", "text"]
    data = dict(np.load(ex["eval"]))
    feeds = {"image": data["image"][:8], "input_ids": data["input_ids"][:8]}
    assert _max_err(split.run(feeds), rt.load(whole.bundle).run(feeds)) <= 1e-4
    # edgemm run on the split bundle writes what the pipeline returns.
    np.savez(tmp_path / "in.npz", **feeds)
    proc = cli("run", out, "--data", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["logits"], split.run(feeds)["logits"], atol=1e-6)
    # Text outputs of 8 samples reused beside 3 images: the fusion part cannot combine them. One InputError
    # naming the reused part and both batches (it was ONNX Runtime's raw shape error).
    text = split.part("text").run({"input_ids": feeds["input_ids"]})
    with pytest.raises(InputError, match=r"part 'fusion' could not combine the reused outputs \(text: .*\[8, ") as exc:
        split.run({"image": feeds["image"][:3]}, reuse={"text": text})
    assert exc.value.field == "reuse.text" and "\n" not in str(exc.value)


@pytest.mark.slow
def test_early_fusion_is_refused_not_split(tmp_path, cli):
    from tests.models import MODELS

    case = MODELS["early_fusion_transformer"]
    np.savez(tmp_path / "calib.npz", **case.data(8, 0))
    proc = cli("compile", case.factory_ref, "--split", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "b")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no separable branches (early fusion)" in proc.stderr
    assert not (tmp_path / "b").exists()


def _tiny_graph(early: bool):
    """image [B, 4] and ids [B, 4]. early: each embedded by one op, then joint layers (early fusion);
    else two-layer towers joined by a final MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"w{i}") for i in range(6)]
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "table"))
    if early:
        nodes = [helper.make_node("MatMul", ["image", "w0"], ["v"], name="patch"),
                 helper.make_node("Gather", ["table", "input_ids"], ["t3"], name="embed"),
                 helper.make_node("ReduceMean", ["t3"], ["t"], name="pool", keepdims=0, axes=[1]),
                 helper.make_node("Add", ["v", "t"], ["x"], name="join"),
                 helper.make_node("MatMul", ["x", "w1"], ["y"], name="joint1"),
                 helper.make_node("MatMul", ["y", "w2"], ["logits"], name="joint2")]
    else:
        nodes = [helper.make_node("MatMul", ["image", "w0"], ["v1"], name="v1"),
                 helper.make_node("MatMul", ["v1", "w1"], ["v"], name="v2"),
                 helper.make_node("Gather", ["table", "input_ids"], ["t3"], name="embed"),
                 helper.make_node("ReduceMean", ["t3"], ["t0"], name="pool", keepdims=0, axes=[1]),
                 helper.make_node("MatMul", ["t0", "w0"], ["t1"], name="t1"),   # w0: shared with vision
                 helper.make_node("MatMul", ["t1", "w3"], ["t"], name="t2"),
                 helper.make_node("Transpose", ["t"], ["tt"], name="tr"),
                 helper.make_node("MatMul", ["v", "tt"], ["logits"], name="join")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4]),
                                           helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_split_graph_cuts_towers_and_refuses_early_fusion(tmp_path):
    """Without torch: a two-tower graph comes apart exactly; an early-fusion graph is refused."""
    import onnx
    import onnxruntime as ort

    from edgemm.split.graph import split_onnx

    feeds = [{"image": np.ones((b, 4), np.float32), "input_ids": np.full((b, 4), 3, np.int64)} for b in (2, 3)]
    onnx.save(_tiny_graph(False), str(tmp_path / "late.onnx"))
    plan = split_onnx(tmp_path / "late.onnx", tmp_path / "parts", samples=feeds)
    assert plan.names == ["vision", "text", "fusion"]
    assert plan.part("fusion").inputs == ["vision.embeds", "text.embeds"]
    assert plan.part("text").inputs == ["input_ids"] and plan.part("vision").inputs == ["image"]
    assert plan.shared_initializers == {"w0": ["text", "vision"]}   # copied into both parts
    ref = ort.InferenceSession(str(tmp_path / "late.onnx")).run(None, feeds[1])[0]
    env = dict(feeds[1])
    for part in plan.parts:
        sess = ort.InferenceSession(str(part.path))
        env.update(zip(part.outputs, sess.run(part.outputs, {i: env[i] for i in part.inputs})))
    np.testing.assert_allclose(env["logits"], ref, atol=1e-5)
    onnx.save(_tiny_graph(True), str(tmp_path / "early.onnx"))
    with pytest.raises(InputError, match="no separable branches") as err:
        split_onnx(tmp_path / "early.onnx", tmp_path / "parts2", samples=feeds)
    assert "\n" not in str(err.value) and "vision: 1" in str(err.value)


def _graph(nodes, inputs, inits):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT if n == "image" else
                                                                         TensorProto.INT64, ["batch", 4])
                                           for n in inputs],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gru_two_towers(rng):
    """Initializers and nodes of a two-layer MatMul vision tower (-> v) and an embedding + one-layer GRU
    text tower (-> h, [1, batch, 4]); tests add the fusion. Also returns the float draw on ``rng``."""
    from onnx import helper

    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = {"w0": f(4, 4), "w1": f(4, 4), "table": f(16, 4), "W": f(1, 12, 4), "R": f(1, 12, 4),
             "axes": np.array([0], np.int64)}
    nodes = [helper.make_node("MatMul", ["image", "w0"], ["v1"], name="v1"),
             helper.make_node("MatMul", ["v1", "w1"], ["v"], name="v2"),
             helper.make_node("Gather", ["table", "input_ids"], ["t3"], name="embed"),
             helper.make_node("Transpose", ["t3"], ["seq"], name="tseq", perm=[1, 0, 2]),
             helper.make_node("GRU", ["seq", "W", "R"], ["y", "h"], name="gru", hidden_size=4)]
    return inits, nodes, f


def test_a_one_layer_gru_text_tower_is_a_part_of_its_own(tmp_path):
    """A GRU is a tower by itself (it was counted as one compute node and fell into fusion)."""
    import onnx
    from onnx import helper

    from edgemm.split.graph import split_onnx

    inits, nodes, _ = _gru_two_towers(np.random.default_rng(0))
    nodes += [helper.make_node("Squeeze", ["h", "axes"], ["t"], name="sq"),
              helper.make_node("Concat", ["v", "t"], ["logits"], name="join", axis=1)]
    onnx.save(_graph(nodes, ["image", "input_ids"], inits), str(tmp_path / "gru.onnx"))
    feeds = [{"image": np.ones((b, 4), np.float32), "input_ids": np.full((b, 4), 3, np.int64)} for b in (2, 3)]
    plan = split_onnx(tmp_path / "gru.onnx", tmp_path / "parts", samples=feeds)
    assert plan.names == ["vision", "text", "fusion"]
    assert plan.part("text").inputs == ["input_ids"]


def _run_parts(plan, feeds):
    import onnxruntime as ort

    env = dict(feeds)
    for part in plan.parts:
        sess = ort.InferenceSession(str(part.path))
        env.update(zip(part.outputs, sess.run(part.outputs, {i: env[i] for i in part.inputs})))
    return env


def _interface_dims(plan) -> dict[str, list]:
    import onnx

    dims = {}
    for part in plan.parts:
        for vi in onnx.load(str(part.path)).graph.input:
            if vi.name in plan.interface:
                dims[vi.name] = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    return dims


def test_interface_tensors_keep_the_batch_on_axis_0(tmp_path):
    """Each part is calibrated and judged along axis 0, so no tensor may cross a cut batch-last: a
    transpose made in a tower (CLIP's image_embeds.T) moves into the part reading it, and a tensor a
    compute node makes batch-second (a GRU's h_n: [1, batch, hidden]) crosses transposed batch-first."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from edgemm.split.graph import split_onnx

    feeds = [{"image": np.ones((b, 4), np.float32), "input_ids": np.full((b, 4), 3, np.int64)} for b in (2, 3)]
    onnx.save(_tiny_graph(False), str(tmp_path / "late.onnx"))   # ends in MatMul(v, Transpose(t))
    plan = split_onnx(tmp_path / "late.onnx", tmp_path / "parts", samples=feeds)
    assert _interface_dims(plan) == {"vision.embeds": ["batch", 4], "text.embeds": ["batch", 4]}
    assert "Transpose" in {n.op_type for n in onnx.load(str(plan.part("fusion").path)).graph.node}
    assert "Transpose" not in {n.op_type for n in onnx.load(str(plan.part("text").path)).graph.node}

    rng = np.random.default_rng(0)
    inits, nodes, f = _gru_two_towers(rng)      # h: [1, batch, 4]
    nodes += [helper.make_node("Unsqueeze", ["v", "axes"], ["v3"], name="vu"),       # [1, batch, 4]
              helper.make_node("Add", ["v3", "h"], ["j"], name="join"),
              helper.make_node("Squeeze", ["j", "axes"], ["logits"], name="out")]
    onnx.save(_graph(nodes, ["image", "input_ids"], inits), str(tmp_path / "gru.onnx"))
    feeds = [{"image": f(b, 4), "input_ids": rng.integers(0, 16, (b, 4)).astype(np.int64)} for b in (2, 3)]
    plan = split_onnx(tmp_path / "gru.onnx", tmp_path / "gru-parts", samples=feeds)
    assert plan.names == ["vision", "text", "fusion"]
    assert _interface_dims(plan) == {"vision.embeds": ["batch", 4], "text.embeds": ["batch", 1, 4]}
    assert plan.interface["text.embeds"]["original"] == "h.batch_first"
    want = ort.InferenceSession(str(tmp_path / "gru.onnx")).run(None, feeds[1])[0]
    np.testing.assert_allclose(_run_parts(plan, feeds[1])["logits"], want, atol=1e-6)


def test_a_fixed_batch_model_is_cut_batch_first_and_its_parts_calibrated_call_by_call(tmp_path):
    """One probe batch (the model's own, 2): a [4, 2] transpose still moves out of the tower, and the
    downstream parts' calibration data is made 2 samples per call (one call of all samples failed)."""
    import onnx
    import onnxruntime as ort

    from edgemm.split.build import _interface_data
    from edgemm.split.graph import split_onnx

    model = _tiny_graph(False)
    for vi in model.graph.input:
        vi.type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    rng = np.random.default_rng(1)
    data = {"image": rng.standard_normal((5, 4)).astype(np.float32),
            "input_ids": rng.integers(0, 16, (5, 4)).astype(np.int64)}
    plan = split_onnx(tmp_path / "fixed.onnx", tmp_path / "parts", samples=[{k: v[:2] for k, v in data.items()}])
    assert _interface_dims(plan) == {"vision.embeds": [2, 4], "text.embeds": [2, 4]}
    env = _interface_data(plan, data)
    assert {k: v.shape[0] for k, v in env.items()} == dict.fromkeys(env, 4)   # 2 calls of 2; the 5th dropped
    sess = ort.InferenceSession(str(tmp_path / "fixed.onnx"))
    for start in (0, 2):
        want = sess.run(None, {k: v[start:start + 2] for k, v in data.items()})[0]
        np.testing.assert_allclose(env["logits"][start:start + 2], want, atol=1e-5)


def test_exclude_patterns_reach_the_parts_holding_their_nodes(tmp_path):
    """--exclude with --split: each part gets the patterns selecting its nodes; one selecting nothing is
    refused in one line as without --split."""
    import onnx

    from edgemm.split.build import _exclude_per_part
    from edgemm.split.graph import split_onnx

    feeds = [{"image": np.ones((b, 4), np.float32), "input_ids": np.full((b, 4), 3, np.int64)} for b in (2, 3)]
    onnx.save(_tiny_graph(False), str(tmp_path / "late.onnx"))
    plan = split_onnx(tmp_path / "late.onnx", tmp_path / "parts", samples=feeds)
    cfg = CompileConfig(model="m.onnx", split=True, precision="int8", calib="c.npz", exclude=["op:Transpose,v2", "t1"])
    assert _exclude_per_part(plan, tmp_path / "late.onnx", cfg) == {
        "vision": ["v2"], "text": ["t1"], "fusion": ["op:Transpose"]}
    cfg = CompileConfig(model="m.onnx", split=True, precision="int8", calib="c.npz", exclude=["v2,nothing.*"])
    with pytest.raises(InputError, match="'nothing.\\*' matches no node") as err:
        _exclude_per_part(plan, tmp_path / "late.onnx", cfg)
    assert "\n" not in str(err.value)


@pytest.mark.slow   # an INT8 split compile: ~40 s on the shared 2 cores
def test_split_int8_keeps_excluded_modules_in_float_in_their_part(zoo_examples, tmp_path):
    ex = zoo_examples["dual-encoder"]
    result = _compile(ex["exported_program"], tmp_path / "excl", calib=str(ex["calib"]), split=True,
                      precision="int8", int8_recipe="dynamic_per_channel", exclude=["module:image_proj"])
    exclusions = result.manifest["precision"]["exclusions"]
    assert exclusions["per_part"] == {"vision": ["module:image_proj"], "text": [], "fusion": []}
    import onnx

    vision = {n.name: n.op_type for n in onnx.load(str(result.bundle / "parts/vision.onnx")).graph.node}
    assert exclusions["nodes"] and all(vision[n] in ("MatMul", "Add", "Gemm") for n in exclusions["nodes"])
    assert "MatMulInteger" in vision.values()   # the rest of the tower is INT8
    assert result.report["passed"]


def test_an_interface_tensor_with_no_batch_axis_is_refused_naming_it(tmp_path):
    """A tower's mean over the batch has no sample axis to calibrate along: refused in one line."""
    import onnx
    from onnx import helper

    from edgemm.split.graph import split_onnx

    rng = np.random.default_rng(0)
    inits = {n: rng.standard_normal((4, 4)).astype(np.float32) for n in ("w0", "w1", "w2", "w3")}
    inits["table"] = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["image", "w0"], ["v1"], name="v1"),
             helper.make_node("MatMul", ["v1", "w1"], ["v2"], name="v2"),
             helper.make_node("ReduceMean", ["v2"], ["v"], name="batch_mean", keepdims=1, axes=[0]),  # [1, 4]
             helper.make_node("Gather", ["table", "input_ids"], ["t0"], name="embed"),
             helper.make_node("ReduceMean", ["t0"], ["t1"], name="pool", keepdims=0, axes=[1]),
             helper.make_node("MatMul", ["t1", "w2"], ["t2"], name="t2"),
             helper.make_node("MatMul", ["t2", "w3"], ["t"], name="t3"),
             helper.make_node("Add", ["t", "v"], ["logits"], name="join")]
    onnx.save(_graph(nodes, ["image", "input_ids"], inits), str(tmp_path / "mean.onnx"))
    feeds = [{"image": np.ones((b, 4), np.float32), "input_ids": np.full((b, 4), 3, np.int64)} for b in (2, 3)]
    with pytest.raises(InputError, match=r"tensor 'v' crossing from part vision to fusion has no batch axis") as err:
        split_onnx(tmp_path / "mean.onnx", tmp_path / "parts", samples=feeds)
    assert "\n" not in str(err.value) and "[1, 4] at batch 2" in str(err.value) and "--branch" in str(err.value)


def test_two_towers_of_one_modality_are_refused_not_split_into_one_part(tmp_path):
    """Query and document towers sharing an embedding are both 'text': one part, nothing to split."""
    import onnx
    from onnx import helper

    from edgemm.split.graph import split_onnx

    rng = np.random.default_rng(0)
    inits = {n: rng.standard_normal((4, 4)).astype(np.float32) for n in ("w0", "w1", "w2", "w3")}
    inits["table"] = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "query_ids"], ["q0"], name="qe"),
             helper.make_node("ReduceMean", ["q0"], ["q1"], name="qp", keepdims=0, axes=[1]),
             helper.make_node("MatMul", ["q1", "w0"], ["q2"], name="q2"),
             helper.make_node("MatMul", ["q2", "w1"], ["q"], name="q3"),
             helper.make_node("Gather", ["table", "doc_ids"], ["d0"], name="de"),
             helper.make_node("ReduceMean", ["d0"], ["d1"], name="dp", keepdims=0, axes=[1]),
             helper.make_node("MatMul", ["d1", "w2"], ["d2"], name="d2"),
             helper.make_node("MatMul", ["d2", "w3"], ["d"], name="d3"),
             helper.make_node("Mul", ["q", "d"], ["logits"], name="score")]
    onnx.save(_graph(nodes, ["query_ids", "doc_ids"], inits), str(tmp_path / "two.onnx"))
    feeds = [{"query_ids": np.full((b, 4), 3, np.int64), "doc_ids": np.full((b, 4), 2, np.int64)} for b in (2, 3)]
    with pytest.raises(InputError, match=r"one part \(text\): nothing to split"):
        split_onnx(tmp_path / "two.onnx", tmp_path / "parts", samples=feeds)
    assert not (tmp_path / "parts").exists() or not any((tmp_path / "parts").iterdir())


def test_cpu_parts_skip_the_engine_search_they_could_not_carry(tmp_path, monkeypatch):
    """A split part ships its ONNX Runtime model only: it must not build and time OpenVINO candidates
    (it did, even under --cpu-engines onnxruntime, and a winner was dropped)."""
    import edgemm.quant as quant
    from edgemm import targets
    from edgemm.split.build import _part_precision_stage
    from edgemm.split.graph import Part

    seen = []

    def fake_apply(path, out, req):
        seen.append(req)
        raise RuntimeError("stop here")

    monkeypatch.setattr(quant, "apply_precision", fake_apply)
    cfg = CompileConfig(model="m.pt2", precision="int8", calib="c.npz", split=True)
    calib = {"image": np.zeros((4, 4), np.float32)}
    with pytest.raises(RuntimeError, match="stop here"):
        _part_precision_stage(Part("vision", ["image"], ["vision.embeds"], []), cfg, targets.load("cpu"),
                              calib, calib, tmp_path, {}, lambda m: None)
    assert seen[0].precision == "int8" and seen[0].cpu_engines == "onnxruntime"


def test_placement_is_checked_against_the_target(tmp_path):
    from edgemm import targets
    from edgemm.split.build import parse_placement

    assert parse_placement("vision=dla,text=gpu", targets.load("jetson-agx-orin")) == {"vision": "dla0", "text": "gpu"}
    for target, text, match in (("cpu", "vision=dla0", "runs onnxruntime"), ("h100", "vision=dla0", "no DLA cores"),
                                ("jetson-agx-orin", "vision=dla5", "DLA cores 0..1"),
                                ("jetson-agx-orin", "vision=tpu", "unknown device"),
                                ("jetson-agx-orin", "eyes=gpu", "PART=DEVICE")):
        with pytest.raises(InputError, match=match) as err:
            parse_placement(text, targets.load(target))
        assert "\n" not in str(err.value) and "--place" in str(err.value)
    with pytest.raises(InputError, match="add --split"):
        CompileConfig(model="m.pt2", place="vision=gpu").validate()
    with pytest.raises(InputError, match="not available with --split"):
        CompileConfig(model="m.pt2", split=True, precision="int8", calib="c.npz",
                      accuracy_target="cosine>=0.99").validate()
    CompileConfig(model="m.pt2", split=True, precision="int8", calib="c.npz", exclude=["op:Softmax"]).validate()
    # A DLA part refuses what --dla refuses on a whole model (it used to drop them silently for that part).
    orin = dict(model="m.pt2", split=True, precision="fp16", target="jetson-agx-orin", place="vision=dla0")
    CompileConfig(**orin).validate()
    with pytest.raises(InputError, match=r"one static profile \(part vision on DLA\)"):
        CompileConfig(**orin, profile_batches=["1:4:16", "16:32:64"]).validate()
    with pytest.raises(InputError, match=r"cannot be refitted \(part vision on DLA\)"):
        CompileConfig(**orin, refittable=True).validate()
    CompileConfig(**{**orin, "place": "vision=gpu"}, refittable=True, profile_batches=["1:4:64"]).validate()


def test_tensorrt_split_bundle_builds_one_engine_per_part_with_its_placement(zoo_examples, tmp_path):
    ex = zoo_examples["dual-encoder"]
    result = _compile(ex["exported_program"], tmp_path / "trt", calib=str(ex["calib"]), split=True,
                      target="jetson-agx-orin", precision="fp16", place="vision=dla0,text=gpu")
    bundle = result.bundle
    parts = {p["name"]: p for p in result.manifest["pipeline"]["parts"]}
    assert {n: p["placement"] for n, p in parts.items()} == {"vision": "dla0", "text": "gpu", "fusion": "gpu"}
    top = (bundle / "build.sh").read_text()
    for name in ("vision", "text", "fusion"):
        assert f'bash "$HERE/parts/{name}/build.sh" "$OUT_DIR/{name}.engine"' in top
        assert parts[name]["backend"]["onnx"] in result.manifest["files"]
    vision = (bundle / "parts/vision/build.sh").read_text()
    text = (bundle / "parts/text/build.sh").read_text()
    assert "--useDLACore=0" in vision and "--allowGPUFallback" in vision
    assert "--useDLACore" not in text
    assert top.index("parts/vision") < top.index("parts/text") < top.index("parts/fusion")
    config = json.loads((bundle / "parts/vision/build_config.json").read_text())
    assert config["options"]["dla_core"] == 0
    # No GPU here: the parts' ONNX ran on ONNX Runtime CPU as the pipeline, and the compile gate judged it.
    assert result.report["passed"] and "each part's ONNX" in result.report["simulated"]
    _check_edgemm_build_records_one_engine_per_part(bundle, tmp_path)


def _engines_that_no_tensorrt_built(bundle, manifest) -> dict:
    """TEST ONLY, where no TensorRT exists: stands in for split_build.build_parts by writing each part's
    ``<engine>.building`` with bytes that are not an engine, and a ``built`` record saying no TensorRT ran,
    so that the manifest logic can be checked; nothing here can pass for a real build."""
    from edgemm.backends.tensorrt.split_build import BUILDING_SUFFIX, part_engine_paths

    built = {}
    for part, (_entry, _rel, path, _onnx) in part_engine_paths(bundle, manifest, str(bundle / "manifest.json")).items():
        path.with_name(path.name + BUILDING_SUFFIX).write_bytes(f"not an engine: {part}".encode())
        built[part] = {"builder": "test stand-in: no TensorRT ran", "tensorrt_version": None}
    return built


def _check_edgemm_build_records_one_engine_per_part(bundle, tmp_path):
    import hashlib
    import shutil

    from edgemm.backends.tensorrt.package import adopt_engine, finish_portable_bundle
    from edgemm.backends.tensorrt.split_build import record_part_engines
    from edgemm.errors import BundleError, DependencyError
    from edgemm.runtime.manifest import load_manifest

    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(DependencyError, match="cannot build here") as err:   # no TensorRT here: nothing written
        finish_portable_bundle(bundle)
    assert f"bash {bundle / 'build.sh'}" in str(err.value) and "\n" not in str(err.value)
    assert (bundle / "manifest.json").read_bytes() == before and not list(bundle.rglob("*.engine*"))
    with pytest.raises(BundleError, match="--from-engine and --refit handle single-engine bundles"):
        adopt_engine(bundle, tmp_path / "x.engine")

    # A part without its built engine: refused before anything moves.
    half = tmp_path / "half"
    shutil.copytree(bundle, half)
    manifest = load_manifest(half, verify=True)   # as edgemm build reads it, before building
    built = _engines_that_no_tensorrt_built(half, manifest)
    (half / "parts/text/model.engine.building").unlink()
    with pytest.raises(BundleError, match="no engine was built for part text"):
        record_part_engines(half, manifest, str(half / "manifest.json"), built)
    assert (half / "manifest.json").read_bytes() == before and not (half / "parts/vision/model.engine").exists()

    manifest = load_manifest(bundle, verify=True)
    built = _engines_that_no_tensorrt_built(bundle, manifest)
    engines = record_part_engines(bundle, manifest, str(bundle / "manifest.json"), built)
    assert engines == [bundle / f"parts/{p}/model.engine" for p in ("vision", "text", "fusion")]
    manifest = load_manifest(bundle, verify=True)   # every file, the engines included, matches its sha256
    document = manifest.to_dict()
    assert document["backend"]["portable"] is False
    for entry in document["pipeline"]["parts"]:
        rel = f"parts/{entry['name']}/model.engine"
        assert entry["backend"]["engine"] == rel and entry["backend"]["portable"] is False
        assert entry["backend"]["built"]["builder"] == "test stand-in: no TensorRT ran"
        assert document["files"][rel] == hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
    assert {e["name"]: e["placement"] for e in document["pipeline"]["parts"]} == {
        "vision": "dla0", "text": "gpu", "fusion": "gpu"}
    assert not list(bundle.rglob("*.building"))


@pytest.mark.slow
def test_split_int8_dual_encoder_passes_the_cosine_bars(zoo_examples, tmp_path):
    ex = zoo_examples["dual-encoder"]
    result = _compile(ex["exported_program"], tmp_path / "int8", calib=str(ex["calib"]), split=True,
                      output_names="image_embeds,text_embeds,logits_per_image", precision_policy="vision=int8,text=int8,fusion=fp32")
    assert result.report["passed"]
    recipes = result.manifest["precision"]["recipe"]["parts"]
    assert recipes["vision"]["mode"] == "int8" and recipes["fusion"]["mode"] == "fp32"
    for name in ("image_embeds", "text_embeds"):
        assert result.report["outputs"][name]["mean_cosine"] >= 0.99


@pytest.mark.slow
def test_split_hf_clip_from_config_equals_unsplit(tmp_path):
    from tests.models import MODELS

    case = MODELS["clip"]
    np.savez(tmp_path / "calib.npz", **case.data(16, 0))
    split = _compile(case.factory_ref, tmp_path / "split", calib=str(tmp_path / "calib.npz"), split=True)
    whole = _compile(case.factory_ref, tmp_path / "whole", calib=str(tmp_path / "calib.npz"))
    bundle = rt.load(split.bundle)
    assert bundle.parts[:2] == ["vision", "text"] and bundle.parts[-1] == "fusion"
    feeds = case.data(4, 1)
    assert _max_err(bundle.run(feeds), rt.load(whole.bundle).run(feeds)) <= 1e-4
    text = bundle.part("text").run({k: feeds[k] for k in ("input_ids", "attention_mask")})
    again = bundle.run({"pixel_values": feeds["pixel_values"]}, reuse={"text": text})
    assert _max_err(again, bundle.run(feeds)) == 0.0


@pytest.mark.slow   # four CLI runs on a CLIPModel: ~70 s on the shared 2 cores
def test_split_hf_clip_int8_and_fp32_verify_through_the_cli_and_the_api(tmp_path, cli):
    """CLIPModel's fusion reads image_embeds.T ([proj, batch]): its INT8 calibration read axis 0 as the
    sample count ('inputs have different sample counts [16, 24]'). Split FP32 and INT8 bundles verify
    against the torch model, and prompts cached at one count classify images given at another."""
    import torch

    from tests.fixtures import io_models

    saved = io_models.save("clip", tmp_path / "data", formats=())
    factory = f"{io_models.FACTORY}:clip"
    for mode, extra in (("fp32", ()), ("int8", ("--int8", "--int8-recipe", "dynamic_per_channel"))):
        out = tmp_path / mode
        proc = cli("compile", factory, "--trust-pickle", "--split", "--calib", saved["calib"], "--eval", saved["eval"],
                   "-o", out, "--no-thread-tuning", *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        interface = {t["name"]: t["shape"] for t in manifest["pipeline"]["interface"]}
        assert interface == {"image_embeds": ["batch", 16], "text_embeds": ["batch", 16]}
        proc = cli("verify", out, "--reference", factory, "--trust-pickle", "--data", saved["eval"],
                   "--iterations", "0", "--json", "--no-write")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert all(p["passed"] for p in report["split_parts"].values())
        if mode == "fp32":
            assert max(o["max_abs_error"] for o in report["outputs"].values()) <= 1e-4
        else:
            assert manifest["pipeline"]["parts"][0]["precision"]["mode"] == "int8"
            assert min(o["mean_cosine"] for o in report["outputs"].values()) >= 0.99
    # The Python API: 5 prompts encoded once, 3 images against them ([3, 5] logits), as torch computes them.
    data = io_models.data("clip", n=8, seed=3)
    texts = {k: data[k][:5] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = io_models.clip()(pixel_values=torch.from_numpy(data["pixel_values"][:3]),
                                **{k: torch.from_numpy(v) for k, v in texts.items()}).logits_per_image.numpy()
    for mode, tol in (("fp32", 1e-4), ("int8", None)):
        bundle = rt.load(tmp_path / mode)
        cached = bundle.part("text").run(texts)
        got = bundle.run({"pixel_values": data["pixel_values"][:3]}, reuse={"text": cached})["logits_per_image"]
        assert got.shape == (3, 5)
        if tol is not None:
            assert float(np.abs(got - want).max()) <= tol
        else:
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            assert cos.min() >= 0.99


def test_a_part_with_nothing_quantized_is_not_labelled_int8(tmp_path):
    """A text part of Gather + GRU comes out of the INT8 recipe unchanged: the label must say fp32."""
    import onnx
    from onnx import helper

    from edgemm.split.build import _has_quantized_ops

    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = {"table": f(16, 4), "W": f(1, 12, 4), "R": f(1, 12, 4)}
    gru = [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
           helper.make_node("GRU", ["e", "W", "R"], ["y", "h"], name="gru", hidden_size=4)]
    onnx.save(_graph(gru, ["input_ids"], inits), str(tmp_path / "plain.onnx"))
    assert not _has_quantized_ops(tmp_path / "plain.onnx")
    dq = [helper.make_node("DynamicQuantizeLinear", ["e"], ["q", "s", "z"], name="dq")]
    onnx.save(_graph(gru[:1] + dq, ["input_ids"], inits), str(tmp_path / "dyn.onnx"))
    assert _has_quantized_ops(tmp_path / "dyn.onnx")


def test_a_tensorrt_part_with_nothing_to_quantize_is_built_fp16(tmp_path):
    """TensorRT target, --int8: modelopt refuses a Gather + GRU part outright ('placed no int8 Q/DQ nodes',
    naming the model file, not the part); like the CPU target's relabel to fp32, the part is built at
    the best float TensorRT runs (fp16) with a note saying why, and the other parts stay int8."""
    pytest.importorskip("modelopt.onnx.quantization")
    import onnx
    from onnx import helper

    from edgemm import targets
    from edgemm.split.build import _part_precision_stage
    from edgemm.split.graph import Part

    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = {"table": f(16, 4), "W": f(1, 12, 4), "R": f(1, 12, 4)}
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
             helper.make_node("GRU", ["e", "W", "R"], ["y", "h"], name="gru", hidden_size=4),
             helper.make_node("ReduceMean", ["y"], ["logits"], name="pool", keepdims=0)]
    onnx.save(_graph(nodes, ["input_ids"], inits), str(tmp_path / "text.onnx"))
    part = Part("text", ["input_ids"], ["logits"], [], path=tmp_path / "text.onnx")
    calib = {"input_ids": rng.integers(0, 16, (8, 4)).astype(np.int64)}
    cfg = CompileConfig(model="m.pt2", precision="int8", calib="c.npz", split=True, target="h100")
    said = []
    result = _part_precision_stage(part, cfg, targets.load("h100"), calib, calib, tmp_path, {}, said.append)
    assert result.mode == "fp16"
    assert any("no operator int8 quantizes here" in n and "runs fp16" in n for n in result.notes), result.notes
    assert any("text: fp16" in m for m in said), said


def test_a_tiny_branch_folded_into_fusion_is_said(tmp_path):
    """A one-projection audio branch joins the fusion part (documented): compile says so in one line, and a
    --precision naming it says why it is no part (it only said 'the split has no part')."""
    import onnx
    from onnx import TensorProto, helper

    from edgemm import targets
    from edgemm.split.build import build_split
    from edgemm.split.graph import split_onnx

    rng = np.random.default_rng(0)
    inits = {k: rng.standard_normal((4, 4)).astype(np.float32) for k in ("v1", "v2", "t1", "t2", "a1")}
    inits["table"] = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["image", "v1"], ["v0"], name="v1"),
             helper.make_node("MatMul", ["v0", "v2"], ["v"], name="v2"),
             helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
             helper.make_node("ReduceMean", ["e"], ["e0"], name="pool", keepdims=0, axes=[1]),
             helper.make_node("MatMul", ["e0", "t1"], ["t0"], name="t1"),
             helper.make_node("MatMul", ["t0", "t2"], ["t"], name="t2"),
             helper.make_node("MatMul", ["audio", "a1"], ["a"], name="a1"),     # a lone projection
             helper.make_node("Add", ["v", "t"], ["vt"], name="join"),
             helper.make_node("Add", ["vt", "a"], ["logits"], name="join2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4]),
                                           helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 4]),
                                           helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    feeds = [{"image": np.ones((b, 4), np.float32), "input_ids": np.full((b, 4), 3, np.int64),
              "audio": np.ones((b, 4), np.float32)} for b in (2, 3)]
    plan = split_onnx(tmp_path / "m.onnx", tmp_path / "parts", samples=feeds)
    assert plan.names == ["vision", "text", "fusion"]
    assert plan.folded == {"audio": "1 compute node, a part needs >= 2"}

    said = []
    cfg = CompileConfig(model="m.onnx", precision_policy="audio=fp32", split=True)
    (tmp_path / "stage").mkdir()
    with pytest.raises(InputError) as err:
        build_split(tmp_path / "m.onnx", tmp_path / "work", tmp_path / "stage", cfg, targets.load("cpu"), [], None,
                    None, "m", said.append, samples=feeds)
    assert [m for m in said if "folded" in m] == [
        "  folded into the fusion part: audio (1 compute node, a part needs >= 2)"]
    assert "audio was folded into fusion: 1 compute node" in str(err.value)


def test_a_part_precision_error_names_the_part(tmp_path, monkeypatch):
    """An error raised on a part's own file reached the user naming the model (the part file is staged
    and gone): it now says which part failed."""
    import edgemm.quant as quant
    from edgemm import targets
    from edgemm.split.build import _part_precision_stage
    from edgemm.split.graph import Part

    def failing(path, out, req):
        raise InputError("modelopt int8 quantization failed (boom)", file=path, fix="run with --verbose")

    monkeypatch.setattr(quant, "apply_precision", failing)
    cfg = CompileConfig(model="m.pt2", precision="int8", calib="c.npz", split=True)
    calib = {"image": np.zeros((4, 4), np.float32)}
    with pytest.raises(InputError) as err:
        _part_precision_stage(Part("vision", ["image"], ["vision.embeds"], [], path=tmp_path / "vision.onnx"), cfg,
                              targets.load("cpu"), calib, calib, tmp_path, {}, lambda m: None)
    assert err.value.detail == "part vision: modelopt int8 quantization failed (boom)"
    assert err.value.file == str(tmp_path / "vision.onnx") and err.value.fix == "run with --verbose"
