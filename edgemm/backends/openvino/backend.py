"""OpenVINO on CPU. Today it runs as a *variant* of an ONNX Runtime bundle (the CPU engine search writes
OpenVINO IR beside the ORT model, see ``__init__.py``), so it is not a target profile's backend: its
package step is the variant writer, and the runtime opens it through the registry like any backend."""

from __future__ import annotations

from pathlib import Path

from ..base import Backend, PackageRequest


class OpenVinoBackend(Backend):
    name = "openvino"
    title = "OpenVINO CPU"
    python_package = "openvino"
    device = "cpu"
    thread_count = True

    def check_target(self, profile, bad) -> None:
        raise bad("backend", "openvino runs as a variant of an onnxruntime CPU bundle (chosen by the CPU engine "
                             "search), not as a target's backend")

    def package(self, model_path: Path, stage: Path, target, request: PackageRequest) -> dict:
        raise NotImplementedError("OpenVINO IR is written as a bundle variant (backends/openvino.save_variant)")

    def open_session(self, path: Path, manifest: dict, **options):
        from ...runtime.openvino_session import OpenVinoSession  # imports openvino lazily, inside

        options.pop("providers", None)  # an ONNX Runtime option
        return OpenVinoSession(path, manifest, **options)
