"""TensorRT: engines built here, or portable bundles finished on the device (``edgemm build``).
TensorRT itself is imported only by the runtime session and the engine builder."""

from __future__ import annotations

from pathlib import Path

from ...text_numbers import ascii_int
from ..base import Backend, PackageRequest

TRITON_MODEL_FILE = "model.plan"   # Triton's TensorRT backend's default file name


class TensorRTBackend(Backend):
    name = "tensorrt"
    title = "TensorRT"
    python_package = "tensorrt"
    device = "gpu"
    sparse_kernels = True
    engine_options = True
    part_placement = True      # GPU or a DLA core per split part
    low_float_kernels = True
    triton_kinds = ("gpu",)    # an engine runs on the GPU only

    def check_target(self, p, bad) -> None:
        """TensorRT's facts about a GPU: compute capability decides FP8, the stack names its versions."""
        from ...targets import FP8_MIN_CC

        if p.compute_capability is None:
            raise bad("compute_capability", "required for a TensorRT target")
        try:
            cc = p.cc
        except ValueError:
            raise bad("compute_capability", f"{p.compute_capability!r} is not MAJOR.MINOR") from None
        if ("fp8" in p.precisions) != (cc >= FP8_MIN_CC):
            raise bad("precisions", f"fp8 needs compute capability >= {FP8_MIN_CC[0]}.{FP8_MIN_CC[1]} "
                                    f"and every such GPU has it (this one is {p.compute_capability})")
        if not p.tensorrt_versions:
            raise bad("tensorrt_versions", "a TensorRT target lists the TensorRT versions its stack ships")
        for v in p.tensorrt_versions:
            parts = v.split(".")
            # The patch matters: 11.4.0 has no JetPack/DLA, 11.4.1 has both.
            if len(parts) != 3 or any(ascii_int(x) is None for x in parts):
                raise bad("tensorrt_versions", f"{v!r} is not MAJOR.MINOR.PATCH (e.g. 10.3.0)")
            if int(parts[0]) < 10:
                raise bad("tensorrt_versions", f"{v!r}: edgemm builds with TensorRT 10 or newer")
        if p.workspace_mb is None or p.memory_mb is None:
            raise bad("workspace_mb", "a TensorRT target states memory_mb and workspace_mb")
        if not 0 < p.workspace_mb < p.memory_mb:
            raise bad("workspace_mb", "must be positive and below memory_mb")

    def package(self, model_path: Path, stage: Path, target, request: PackageRequest) -> dict:
        from .options import TensorRTOptions
        from .package import package

        options = TensorRTOptions.from_compile(request.config, target, request.specs)
        return package(model_path, stage, target, options, bundle_name=request.bundle_name)

    def package_part(self, model_path, stage, part, folder, target, request, *, precision, device):
        from .split import package_part

        return package_part(model_path, stage, part, folder, target, request, precision=precision, device=device)

    def split_section(self, stage, parts, target, bundle_name):
        from .split import write_pipeline_build_script

        return write_pipeline_build_script(stage, parts, target, bundle_name)

    def parity_runner(self, stage: Path, manifest):
        """No GPU at compile time: the precision-marked ONNX runs on ORT CPU as an estimate, when ORT can
        run it (FP8 Q/DQ through the simulator); a split bundle part by part."""
        if manifest.sections.get("pipeline") is not None:
            from ...split.build import ort_estimate_runner

            return ort_estimate_runner(stage, manifest)
        onnx_rel = manifest.backend.onnx
        if not onnx_rel:
            return None
        if manifest.precision.value.includes("fp8"):
            from ...quant.fp8_sim import SIMULATED_NOTE, make_runner

            return make_runner(stage / onnx_rel), SIMULATED_NOTE
        from ...onnx_io import cpu_session

        try:
            sess = cpu_session(stage / onnx_rel)
        except Exception:  # ORT cannot run some TensorRT-only Q/DQ patterns
            return None
        names = manifest.output_names
        return (lambda feeds: dict(zip(names, sess.run(names, dict(feeds))))), \
            "TensorRT bundle: accuracy measured by running its Q/DQ ONNX on ONNX Runtime CPU, not the engine"

    def open_session(self, path: Path, manifest: dict, **options):
        from ...runtime.tensorrt_session import TensorRTSession  # imports tensorrt lazily, inside

        return TensorRTSession(path, manifest, **options)

    def serving_refusal(self, section):
        if section.get("portable") or not section.get("engine"):
            # the runtime refuses to load it too, on any server
            return ("is a portable TensorRT bundle with no engine yet", "backend.engine",
                    "run `edgemm build BUNDLE` on the device first, then export it")
        return None

    def triton_platform(self, section, bad, notes, model):
        built = section.get("built") or {}
        cc = built.get("compute_capability") or section.get("compute_capability")
        fields = {"platform": "tensorrt_plan", "default_model_filename": TRITON_MODEL_FILE}
        if cc:
            fields["cc_model_filenames"] = [{"key": str(cc), "value": TRITON_MODEL_FILE}]
        return fields

    def triton_files(self, section, files, part):
        return {section["engine"]: TRITON_MODEL_FILE}

    def triton_profiles(self, section):
        profiles = (section.get("options") or {}).get("profiles")
        return len(profiles) if isinstance(profiles, list) and profiles else 1
