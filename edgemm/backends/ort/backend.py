"""ONNX Runtime on CPU: the bundle holds the precision-marked ONNX file itself."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ..base import Backend, PackageRequest

TRITON_MODEL_FILE = "model.onnx"   # Triton's ONNX Runtime backend's default file name
# ONNX Runtime's dynamic quantization computes each activation's scale over the whole tensor, i.e. over
# every row of the batch (DynamicQuantizeLinear, and the fused kernels ORT builds from it at load).
_ROW_MIXING_OPS = (b"DynamicQuantizeLinear", b"DynamicQuantizeMatMul")


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

    def package_part(self, model_path, stage, part, folder, target, request, *, precision, device):
        from . import package_part

        return package_part(model_path, stage, part, folder, request.recipe)

    def split_section(self, stage, parts, target, bundle_name):
        return {"providers": ["CPUExecutionProvider"]}

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

    def triton_platform(self, section, bad, notes, model):
        file = section.get("model") or TRITON_MODEL_FILE
        if not isinstance(file, str) or "/" in file:
            raise bad(f"model {file!r} is not at the bundle's top level", "backend.model", "use --flavor edgemm")
        fields: dict = {"platform": "onnxruntime_onnx", "default_model_filename": file}
        params = {}
        threads = section.get("intra_op_threads")
        if isinstance(threads, int) and threads > 0:
            params["intra_op_thread_count"] = str(threads)
        disabled = section.get("disabled_optimizers") or []
        if disabled:
            # ONNX Runtime's session key; Triton's ORT backend passes only the options its README lists.
            params["edgemm.disabled_optimizers"] = ";".join(map(str, disabled))
            notes.append(f"{model}: the bundle disables ORT optimizers ({', '.join(map(str, disabled))}); "
                         f"Triton's ONNX Runtime backend cannot, so the native model may run slower "
                         f"(--flavor edgemm applies them)")
        if params:
            fields["parameters"] = params
        return fields

    def triton_files(self, section, files, part):
        if part:   # its model file and the external data beside it, flat
            model = section["model"]
            return {rel: PurePosixPath(rel).name for rel in files if rel == model or rel.startswith(model + ".")}
        # every hashed file (the ONNX model and its external data) under its own name: the model names them
        return {rel: rel for rel in files}

    def rows_mix(self, model_files, read):
        """Measured on the zoo's cross-attention INT8 bundle: the same sample answered up to 0.04 apart (abs,
        logits of ~1) alone and merged with other requests by Triton's dynamic batcher. Read from the
        files' bytes (op types are plain strings in an ONNX protobuf): no onnx package needed to export."""
        for rel in model_files:
            data = read(rel)
            if any(op in data for op in _ROW_MIXING_OPS):
                return ("dynamic INT8 quantizes activations with one scale per batch, so a request's answer "
                        "would depend on the requests merged with it")
        return None
