"""edgemm/onnx_io.py: the one session factory and the one ONNX writer of the compile side."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgemm import onnx_io

EDGEMM = Path(__file__).resolve().parents[2] / "edgemm"


def _matmul_model(width: int = 32):  # 4 KiB of weights: over onnx's 1 KiB external-data threshold
    w = numpy_helper.from_array(np.arange(width * width, dtype=np.float32).reshape(width, width) / 100, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_save_onnx_external_data_named_after_the_final_file(tmp_path):
    model = _matmul_model()
    weights = numpy_helper.to_array(model.graph.initializer[0])  # before saving moves them out of the proto
    out = tmp_path / "sub" / "model.onnx"
    onnx_io.save_onnx(model, out, external=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp left
    loaded = onnx.load(str(out))  # resolves the data file by the name written in the graph
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weights)


def test_save_onnx_small_model_is_one_file_and_overwrites_atomically(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    onnx_io.save_onnx(_matmul_model(), out)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert onnx_io.load_graph(out).graph.node[0].op_type == "MatMul"


def test_is_large_uses_the_one_limit(monkeypatch):
    model = _matmul_model()
    assert not onnx_io.is_large(model)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", model.ByteSize() - 1)
    assert onnx_io.is_large(model)


def test_cpu_session_from_path_and_bytes_agree(tmp_path):
    model = _matmul_model()
    path = tmp_path / "m.onnx"
    onnx_io.save_onnx(model, path)
    x = np.ones((2, 32), dtype=np.float32)
    from_path = onnx_io.cpu_session(path, spinning=False, intra_op_threads=1).run(None, {"x": x})[0]
    from_bytes = onnx_io.cpu_session(model.SerializeToString(), inter_op_threads=1).run(None, {"x": x})[0]
    assert np.allclose(from_path, x @ numpy_helper.to_array(model.graph.initializer[0]))
    assert np.array_equal(from_path, from_bytes)


def test_graph_outputs_lists_symbolic_dims(tmp_path):
    path = tmp_path / "m.onnx"
    onnx_io.save_onnx(_matmul_model(), path)
    assert onnx_io.graph_outputs(path) == [{"name": "y", "dtype": "float32", "shape": ["batch", 32]}]


def test_compile_side_opens_sessions_and_saves_models_only_through_onnx_io():
    """The runtime (torch-free, deployable) keeps its own sessions; everything else goes through onnx_io,
    so that session options and the external-data limit are set in one place."""
    offenders = []
    for path in sorted(EDGEMM.rglob("*.py")):
        rel = path.relative_to(EDGEMM).as_posix()
        if rel == "onnx_io.py" or rel.startswith("runtime/"):
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\.InferenceSession\(", r"save_as_external_data\s*="):
            if re.search(pattern, text):
                offenders.append(f"{rel}: {pattern}")
    assert not offenders, offenders
