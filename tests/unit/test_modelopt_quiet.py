"""modelopt's Q/DQ quantization must not write to the console: its progress bars, its logger (which
prints every warning twice: its own stdout handler, then the root logger's), Python warnings,
polygraphy's G_LOGGER and native output are captured, logged at INFO on the "edgemm" logger, and a
failure is one line quoting the last relevant output."""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings

import numpy as np
import pytest

from edgemm.capture import captured_output
from edgemm.errors import InputError
from edgemm.quant import modelopt_qdq
from edgemm.quant.modelopt_qdq import quantize_qdq


class _StderrHandler(logging.StreamHandler):
    """basicConfig's handler, writing to whatever sys.stderr is when a record comes (capfd's here)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@pytest.fixture
def cli_logging():
    """The CLI's logging without --verbose (edgemm/cli/main.py): a root handler on stderr, root at ERROR,
    Python warnings through logging. The CLI keeps "edgemm" at WARNING; these tests raise it to INFO to
    read the log through caplog, so the handler drops records below WARNING instead, which still
    lets through the modelopt WARNING records that used to reach it by propagation."""
    root = logging.getLogger()
    handler = _StderrHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(saved)


def _tiny_onnx(path):
    """Two 32-channel convs: wide enough that modelopt places INT8 Q/DQ (it skips small layers)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3)).astype(np.float32) * 0.2, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.05, "w2")
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["out"], name="relu2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 32, 16, 16])],
                              initializer=[w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_int8_qdq_writes_nothing_to_stdout_or_stderr(tmp_path, capfd, caplog, cli_logging):
    pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is needed for Q/DQ generation")
    src = _tiny_onnx(tmp_path / "model.onnx")
    calib = {"image": np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)}
    out = tmp_path / "int8.onnx"
    with caplog.at_level(logging.INFO, logger="edgemm"):
        recipe = quantize_qdq(src, out, calib, "int8")
    stdout, stderr = capfd.readouterr()
    assert stdout == "" and stderr == "", f"stdout={stdout[:500]!r} stderr={stderr[:500]!r}"
    assert out.is_file() and recipe["qdq"]["quantize_linear"] > 0
    # --verbose shows modelopt's output through the "edgemm" logger; modelopt's own records stay off root.
    logged = [r.getMessage() for r in caplog.records if r.name == "edgemm"]
    assert any(m.startswith("modelopt int8 quantization output (entropy calibration):") for m in logged)
    assert not [r for r in caplog.records if r.name.startswith("modelopt")]
    assert logging.getLogger("modelopt").propagate is True   # restored
    # modelopt's console handler (re-made during the call) no longer points at the capture buffer.
    assert not [h for h in logging.getLogger("modelopt.onnx").handlers
                if isinstance(getattr(h, "stream", None), io.StringIO)]


@pytest.fixture
def modelopt_logger():
    """Put the "modelopt.onnx" logger back as it was (the fake below configures it as modelopt does)."""
    lg = logging.getLogger("modelopt.onnx")
    saved = lg.handlers[:], lg.level, lg.propagate
    yield lg
    lg.handlers[:], lg.level, lg.propagate = saved


def _noisy_quantize(*, fail: bool):
    def quantize(**kwargs):
        # What modelopt's configure_logging does at the start of quantize(): a handler on the sys.stdout
        # of the moment, and propagation to the root logger.
        lg = logging.getLogger("modelopt.onnx")
        lg.handlers[:] = [logging.StreamHandler(sys.stdout)]
        lg.setLevel(logging.WARNING)
        lg.propagate = True
        print("Collecting tensor data and making histogram ...")
        sys.stderr.write("  0%|          | 0/78 [00:00<?, ?it/s]\r100%|##########| 78/78 [00:00<00:00, 9.1it/s]\n")
        os.write(2, b"[W:onnxruntime:native] something native\n")
        os.write(1, b"native stdout line\n")
        logging.getLogger("modelopt.onnx").warning("Shared constants were detected")
        warnings.warn("a modelopt deprecation", DeprecationWarning, stacklevel=1)
        try:
            from polygraphy.logger import G_LOGGER
            G_LOGGER.warning("polygraphy says hi")
        except ImportError:
            pass
        if fail:
            print("ERROR - calibration failed for tensor 'conv1_out'")
            print("Collecting tensor data and making histogram ...")
            raise RuntimeError("boom\nsecond line of the traceback text")
        open(kwargs["output_path"], "wb").close()   # no Q/DQ model: refused after the call

    return quantize


@pytest.mark.parametrize("fail", [True, False])
def test_modelopt_failure_is_one_line_and_output_goes_to_the_log(tmp_path, capfd, caplog, cli_logging,
                                                                 modelopt_logger, monkeypatch, fail):
    pytest.importorskip("onnx")
    src = _tiny_onnx(tmp_path / "model.onnx")
    calib = {"image": np.zeros((4, 3, 16, 16), np.float32)}
    monkeypatch.setattr(modelopt_qdq, "_import_modelopt", lambda: (_noisy_quantize(fail=fail), "0.0-test"))
    with caplog.at_level(logging.INFO, logger="edgemm"), pytest.raises(InputError) as info:
        quantize_qdq(src, tmp_path / "q.onnx", calib, "int8")
    stdout, stderr = capfd.readouterr()
    assert stdout == "" and stderr == "", f"stdout={stdout!r} stderr={stderr!r}"
    message = str(info.value)
    assert "\n" not in message
    if fail:
        assert "modelopt int8 quantization failed (RuntimeError: boom;" in message
        assert "calibration failed for tensor 'conv1_out'" in message and "second line" not in message
    else:
        assert "placed no int8 Q/DQ nodes" in message or "wrote no quantized model" in message
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "edgemm")
    for piece in ("Collecting tensor data", "something native", "native stdout line", "Shared constants",
                  "a modelopt deprecation", "100%|##########| 78/78"):
        assert piece in logged
    assert "0%|          | 0/78" not in logged      # progress bars keep only their final state


def test_captured_output_restores_streams_and_fds(capfd):
    before = sys.stdout, sys.stderr, logging.getLogger("modelopt").propagate
    with captured_output() as cap:
        print("py out")
        os.write(2, b"fd err\n")
    assert (sys.stdout, sys.stderr, logging.getLogger("modelopt").propagate) == before
    assert "py out" in cap.text and "fd err" in cap.text
    print("after")
    assert capfd.readouterr().out == "after\n"
    assert cap.last_line() in ("py out", "fd err")
