import pickle

import numpy as np
import pytest
import torch

from edgemm.errors import InputError, SecurityError
from edgemm.frontends import LoadOptions, detect_format, load_model


def test_detect_formats(tiny):
    assert detect_format(str(tiny["torchscript"])) == "torchscript"
    assert detect_format(str(tiny["pt2"])) == "exported_program"
    assert detect_format(str(tiny["pickle"])) == "pickle"
    assert detect_format(str(tiny["state_dict"])) == "pickle"
    assert detect_format("tests.fixtures.tiny_models:build_tiny") == "factory"


def test_torchscript_loads_in_eval_with_input_names(tiny):
    loaded = load_model(str(tiny["torchscript"]))
    assert loaded.format == "torchscript"
    assert loaded.input_names == ["image", "input_ids"]
    assert not loaded.module.training


def test_pt2_carries_specs_and_dynamic_batch(tiny):
    loaded = load_model(str(tiny["pt2"]))
    specs = {s.name: s for s in loaded.input_specs}
    assert specs["image"].shape == ("batch", 3, 16, 16)
    assert specs["input_ids"].dtype == "int64"
    assert specs["image"].ranges["batch"].max == 64


def test_factory_with_safetensors_and_state_dict(tiny):
    a = load_model("tests.fixtures.tiny_models:build_tiny", LoadOptions(weights=str(tiny["safetensors"])))
    b = load_model("tests.fixtures.tiny_models:build_tiny", LoadOptions(weights=str(tiny["state_dict"])))
    assert not a.module.training  # the factory returns a training-mode module: edgemm forces eval
    assert any("training mode" in n for n in a.notes)
    assert a.sha256 != b.sha256
    x = (torch.randn(2, 3, 16, 16), torch.randint(1, 50, (2, 8)))
    torch.testing.assert_close(a.module(*x)["logits"], b.module(*x)["logits"])


def test_factory_weights_mismatch_is_input_error(tmp_path, tiny):
    from safetensors.torch import save_file
    bad = tmp_path / "bad.safetensors"
    save_file({"nope": torch.zeros(2)}, str(bad))
    with pytest.raises(InputError, match="weights do not fit"):
        load_model("tests.fixtures.tiny_models:build_tiny", LoadOptions(weights=str(bad)))


def test_pickled_module_refused_without_trust(tiny):
    with pytest.raises(SecurityError, match="--trust-pickle"):
        load_model(str(tiny["pickle"]))
    loaded = load_model(str(tiny["pickle"]), LoadOptions(trust_pickle=True))
    assert loaded.format == "pickle" and not loaded.module.training


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_malicious_pickle_does_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil(str(sentinel))}, str(evil), pickle_protocol=2)
    assert not sentinel.exists()
    with pytest.raises(SecurityError):
        load_model(str(evil))
    assert not sentinel.exists()


def test_state_dict_as_model_is_explained(tiny):
    with pytest.raises(InputError, match="state_dict"):
        load_model(str(tiny["state_dict"]))


def test_onnx_external_data_escape_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4], np.ones(4, np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    model = helper.make_model(graph)
    sub = tmp_path / "m"
    sub.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = k, v
    path = sub / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(SecurityError, match="escapes"):
        load_model(str(path))


def test_unknown_file_type_and_missing_file(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"x")
    with pytest.raises(InputError, match="unknown model file type"):
        load_model(str(p))
    with pytest.raises(InputError, match="no such file"):
        load_model(str(tmp_path / "absent.pt"))


def test_truncated_torchscript_is_input_error(tmp_path, tiny):
    data = tiny["torchscript"].read_bytes()
    p = tmp_path / "trunc.pt"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_model(str(p))
