"""Can torch itself export a saved model to ONNX? ``python -m tests.models.probe MODEL_NAME FORMAT PATH``.

Run by the matrix only where ``edgemm compile`` failed, to tell a limit of torch (both of torch's ONNX
exporters fail on the file too: the cell is n/a, and edgemm's one-line error must say so) from an edgemm
bug (torch exports it, edgemm does not: the cell fails). Prints ``ok`` or ``torch: <first error line>``.
"""

from __future__ import annotations

import io
import sys
import warnings


def _attempts(case, fmt: str, path: str, weights: str | None):
    import torch

    from .save import _example

    example = _example(case)
    args = tuple(example.values())
    if fmt in ("torchscript", "script"):
        module = torch.jit.load(path)
        yield "torch.onnx.export(TorchScript)", lambda f: torch.onnx.export(module, args, f, dynamo=False)
        return
    if fmt.startswith("pt2"):
        program = torch.export.load(path)
        yield "torch.onnx.export(ExportedProgram)", lambda f: torch.onnx.export(program, f=f, dynamo=True)
        return
    model = case.build()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    yield "torch.onnx.export(dynamo=True)", lambda f: torch.onnx.export(model, (), f, kwargs=example, dynamo=True)
    yield "torch.onnx.export(dynamo=False)", lambda f: torch.onnx.export(model, (), f, kwargs=example, dynamo=False)


def probe(name: str, fmt: str, path: str, weights: str | None = None) -> str:
    from . import MODELS
    from .save import first_line

    errors = []
    warnings.simplefilter("ignore")
    for label, attempt in _attempts(MODELS[name], fmt, path, weights):
        try:
            attempt(io.BytesIO())
            return "ok"
        except Exception as exc:  # torch's own failure is the finding
            while exc.__cause__ is not None:  # torch.onnx wraps torch.export's reason ("step 1/3 ...")
                exc = exc.__cause__
            errors.append(f"{label}: {first_line(exc)}")
    return "torch: " + "; ".join(errors)


if __name__ == "__main__":
    argv = sys.argv[1:]
    print("PROBE:", probe(*argv))
