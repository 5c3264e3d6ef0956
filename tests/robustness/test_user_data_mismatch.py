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
