"""Models as their authors write and save them compile and verify: keyword-only forward(), optional
Hugging Face-style inputs, keyword-exported .pt2, dict/nested/None/duplicate outputs and an output named
like a parameter (through the CLI, FP32 and INT8 on the CPU)."""

import json

import pytest

from tests.fixtures import io_models

F = io_models.FACTORY


def _compile_and_verify(cli, model, saved, out, *extra):
    r = cli("compile", model, "--calib", saved["calib"], "-o", out, "--force", "--no-thread-tuning", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    v = cli("verify", out, "--reference", model, "--data", saved["eval"])
    assert v.returncode == 0, v.stdout + v.stderr
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def keyword_only(tmp_path_factory):
    return io_models.save("keyword_only", tmp_path_factory.mktemp("kwonly"), formats=("pt2_kw",))


def test_keyword_only_forward_as_factory_int8(cli, keyword_only, tmp_path):
    manifest = _compile_and_verify(cli, f"{F}:keyword_only", keyword_only, tmp_path / "b", "--int8")
    assert [i["name"] for i in manifest["inputs"]] == ["image", "tokens"]


def test_keyword_exported_pt2(cli, keyword_only, tmp_path):
    manifest = _compile_and_verify(cli, keyword_only["pt2_kw"], keyword_only, tmp_path / "b")
    assert [i["name"] for i in manifest["inputs"]] == ["image", "tokens"]
    assert manifest["inputs"][0]["shape"][0] == "batch"


def test_optional_parameters_and_kwargs_are_not_required(cli, tmp_path):
    saved = io_models.save("optional_inputs", tmp_path / "m", formats=())
    manifest = _compile_and_verify(cli, f"{F}:optional_inputs", saved, tmp_path / "b")
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "is_longer"]
    assert any("'is_longer' is not used" in n for n in manifest["export"]["notes"])
    # a data key that is no parameter is named in one line
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((4, 6), dtype="int64"), labelz=np.zeros((4, 6), dtype="int64"))
    r = cli("compile", f"{F}:optional_inputs", "--calib", bad, "-o", tmp_path / "c")
    assert r.returncode == 2 and "'labelz' is not a parameter" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("precision", ["--fp32", "--int8"])
def test_odd_outputs_keep_their_names(cli, tmp_path, precision):
    saved = io_models.save("odd_outputs", tmp_path / "m", formats=())
    manifest = _compile_and_verify(cli, f"{F}:odd_outputs", saved, tmp_path / "b", precision)
    names = [o["name"] for o in manifest["outputs"]]
    assert names == ["cls", "embeds", "again", "pooled.mean", "pooled.max"]
    dims = {o["name"]: o["shape"] for o in manifest["outputs"]}
    assert dims["cls"] == ["batch", 6] and dims["pooled.mean"] == ["batch"]


def test_inspect_model_shows_signature_shapes_and_outputs(cli, keyword_only, tmp_path):
    r = cli("inspect", keyword_only["pt2_kw"], "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["forward"] == "forward(*, image, tokens)"
    assert [i["shape"] for i in info["inputs"]] == [["batch", 3, 16, 16], ["batch", 6]]
    assert info["outputs"] == [{"name": "output", "dtype": "float32", "shape": ["batch", 4]}]
    saved = io_models.save("odd_outputs", tmp_path / "m", formats=())
    r = cli("inspect", f"{F}:odd_outputs", "--data", saved["calib"], "--json")
    assert r.returncode == 0, r.stderr
    outs = {o["name"]: o["shape"] for o in json.loads(r.stdout)["outputs"]}
    assert outs == {"cls": ["batch", 6], "embeds": ["batch", 6], "again": ["batch", 6],
                    "pooled.mean": ["batch"], "pooled.max": ["batch"]}
    r = cli("inspect", f"{F}:optional_inputs")
    assert "forward(input_ids, attention_mask=None, position_ids=None, return_loss=False, " \
           "output_hidden_states=None, is_longer=None, **kwargs)" in r.stdout


def test_keyword_exported_pt2_prunes_and_keeps_its_keyword_inputs(cli, keyword_only, tmp_path):
    out = tmp_path / "b"
    r = cli("compile", keyword_only["pt2_kw"], "--calib", keyword_only["calib"], "--prune", "0.3", "-o", out,
            "--no-thread-tuning")
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["image", "tokens"]
    assert manifest["inputs"][0]["shape"][0] == "batch"
