"""Data that does not fit the model, found by trying models nobody here wrote: the model's own forward()
refusing the data (a float16 array into float32 weights, a wrong width, an id past its embedding) is the
user's input error, in one line naming what was fed, not an `internal error`."""

from __future__ import annotations

import numpy as np
import pytest

from edgemm.errors import InputError
from edgemm.frontends import load_model
from edgemm.reference import Reference
from tests.fixtures.tiny_models import make_data

FACTORY = "tests.fixtures.tiny_models:build_tiny"


@pytest.mark.parametrize("change, expect", [
    (lambda d: {**d, "image": d["image"].astype(np.float16)}, "image float16[2, 3"),
    (lambda d: {**d, "image": d["image"].astype(np.float64)}, "image float64[2, 3"),
    (lambda d: {**d, "image": d["image"][:, :2]}, "image float32[2, 2"),
    (lambda d: {**d, "input_ids": -d["input_ids"]}, "input_ids int64[2"),
])
def test_model_raising_on_the_data_is_an_input_error(change, expect):
    loaded = load_model(FACTORY)
    feeds = change(make_data(2))
    with pytest.raises(InputError) as info:
        Reference(loaded, ["image", "input_ids"]).run(feeds)
    line = str(info.value)
    assert line.startswith(f"{FACTORY}: forward(): raised ") and expect in line and "(fix: " in line
    assert "\n" not in line


def test_cli_compile_with_calibration_the_model_refuses(cli, tmp_path):
    data = make_data(8)
    data["image"] = data["image"].astype(np.float16)
    np.savez(tmp_path / "calib.npz", **data)
    res = cli("compile", FACTORY, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "b", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {FACTORY}: forward(): raised RuntimeError") and "image float16" in last
    assert not (tmp_path / "b").exists()


# -- token ids the bundle's embedding has no row for ------------------------------------------------

@pytest.mark.parametrize("bad", [-1, -50, 50, 10 ** 6])
def test_runtime_refuses_token_ids_outside_the_embedding(tiny_bundle, bad):
    """ONNX Runtime's Gather takes -rows..-1 as Python-style indices: a negative id ran and answered with
    another token's row (exit 0, wrong output); ids past the table failed inside ONNX Runtime."""
    import edgemm.runtime as rt

    bundle = rt.load(tiny_bundle)
    assert bundle.token_vocab == {"input_ids": 50}
    feeds = make_data(2)
    bundle.run(feeds)                                   # the calibrated ids run
    feeds["input_ids"][1, 3] = bad
    with pytest.raises(InputError) as info:
        bundle.run(feeds)
    line = str(info.value)
    assert line.startswith("input_ids: ") and f"token id {bad} is outside" in line and "0..49" in line


@pytest.mark.parametrize("command", ["run", "verify", "bench"])
def test_cli_names_the_data_file_holding_a_negative_token_id(cli, tiny, tiny_bundle, tmp_path, command):
    data = make_data(4)
    data["input_ids"][2, 0] = -3
    np.savez(tmp_path / "d.npz", **data)
    args = {"run": ["-o", tmp_path / "o.npz"], "verify": ["--reference", tiny["torchscript"]], "bench": []}
    res = cli(command, tiny_bundle, "--data", tmp_path / "d.npz", *args[command], cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'd.npz'}: input_ids: token id -3 is outside"), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]


# -- --weights: a factory's flag, on every command taking a model ---------------------------------------

@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_weights_for_a_model_file_are_refused_not_ignored(tiny, fmt):
    """`compile model.pt2 --weights other.pt` compiled the .pt2's own weights and said nothing."""
    from edgemm.frontends import LoadOptions

    with pytest.raises(InputError) as info:
        load_model(str(tiny[fmt]), LoadOptions(weights=str(tiny["state_dict"])))
    assert "--weights: applies to a package.module:function factory only" in str(info.value)


def test_cli_inspect_takes_a_factorys_weights(cli, tiny, tiny_bundle, tmp_path):
    """inspect had no --weights, so `edgemm inspect pkg.mod:factory --weights W` (as for compile and
    verify) was a usage error; wrong weights are now refused as they are there."""
    res = cli("inspect", FACTORY, "--weights", tiny["safetensors"], "--data", tiny["calib"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "forward: forward(image, input_ids)" in res.stdout and "output logits: batchx5" in res.stdout
    torch = pytest.importorskip("torch")
    torch.save({"fusion.0.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    for args in ((FACTORY, "--weights", tmp_path / "wrong.pt"), (tiny_bundle, "--weights", tiny["safetensors"])):
        res = cli("inspect", *args, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "weights" in res.stderr
