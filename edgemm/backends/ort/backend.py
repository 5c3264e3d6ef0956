"""ONNX Runtime on CPU: the bundle holds the precision-marked ONNX file itself."""

from __future__ import annotations

from pathlib import Path

from ..base import Backend, PackageRequest


class OrtBackend(Backend):
    name = "onnxruntime"
    title = "ONNX Runtime CPU"
    python_package = "onnxruntime"
    device = "cpu"
    thread_count = True

    def check_target(self, profile, bad) -> None:
        if "fp8" in profile.precisions:
            raise bad("precisions", "FP8 Q/DQ does not run on ONNX Runtime CPU")
        super().check_target(profile, bad)

    def package(self, model_path: Path, stage: Path, target, request: PackageRequest) -> dict:
        from . import package

        return package(model_path, stage, target, request.recipe)

    def tune(self, section, stage, feeds, say) -> None:
        """Record whether the bundle runs faster single-threaded (see threads.py)."""
        from .threads import tune_intra_op_threads

        try:
            tuning = tune_intra_op_threads(stage / section["model"], feeds,
                                           disabled_optimizers=section.get("disabled_optimizers", ()))
        except Exception as exc:  # a measurement, never a reason to fail the compile
            tuning = {"intra_op_threads": 0, "note": f"not measured: {type(exc).__name__}: {str(exc)[:200]}"}
        section["intra_op_threads"] = tuning.pop("intra_op_threads")
        section["threads_tuning"] = tuning
        if section["intra_op_threads"] == 1:
            p50 = tuning["p50_ms"]
            say(f"runtime threads: 1 (p50 {p50['1']:.3f} ms vs {p50['default']:.3f} ms with ORT's default)")

    def parity_runner(self, stage: Path, manifest: dict):
        from ... import runtime

        return runtime.load(stage).run, None

    def open_session(self, path: Path, manifest: dict, **options):
        from ...runtime.ort_session import OrtSession

        return OrtSession(path, manifest, **options)
