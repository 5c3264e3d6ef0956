"""The Backend interface: everything the compile pipeline, the runtime and the parity gate need to know
about one way of running a bundle (after Polygraphy's ``backend/<name>/{loader,runner}``).

A backend is a subclass in ``edgemm/backends/<name>/backend.py`` plus one line in
``edgemm/backends/registry.py:BACKENDS``; its torch-free session lives in ``edgemm/runtime/<name>_session.py``.
Nothing else in edgemm compares backend names: callers ask the registry for the backend object and use
the methods and attributes below. Subclass modules import heavy libraries (TensorRT, OpenVINO, ...)
inside the methods that need them, so that looking a backend up stays cheap for the runtime and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

# A bundle's run function: {input name: numpy array} -> {output name: numpy array}. (Standard library
# only here: the target profiles and the runtime look backends up.)
Run = Callable[[Mapping[str, Any]], dict]


@dataclass(frozen=True)
class PackageRequest:
    """What the compile hands ``Backend.package`` beside the precision-marked ONNX file."""

    config: Any              # the CompileConfig (backend options such as TensorRT's are read from it)
    specs: list              # the bundle's input TensorSpecs
    recipe: dict | None      # the precision recipe (e.g. ORT optimizers the runtime must disable)
    bundle_name: str


class Backend:
    """One backend. Class attributes describe it; methods do the work (defaults: nothing to do)."""

    name: str = ""               # the manifest's backend.name and a target profile's ``backend``
    title: str = ""              # for messages, e.g. "ONNX Runtime CPU"
    device: str = "cpu"          # "cpu" targets (kind = cpu) or "gpu" targets (jetson, datacenter)
    sparse_kernels: bool = False  # 2:4 structured sparsity runs faster (else --sparsity is refused)
    thread_count: bool = False   # the runtime session takes ``intra_op_threads`` (CPU thread pools)
    python_package: str = ""     # what the runtime host must have installed to open its sessions
    # Builds engines with profiles/refit/graphs (--refittable, --profile-batches, --cuda-graph; else refused)
    engine_options: bool = False
    # Whose rows of ``quant.RECIPES`` build this backend's precisions ("" = its own name): a backend that
    # runs the same graphs as another (e.g. ONNX Runtime under another runtime) reuses its quantizers.
    quantizes_as: str = ""
    # Split bundles (edgemm/split/): a part may be placed on another device of the target (--place vision=dla0)
    part_placement: bool = False
    # Its kernels run FP16/BF16 faster than FP32. Without them, a branch asked for in fp16/bf16 (--precision
    # text=fp16, a split part) is built fp32 with a note: inserted casts would make it slower, not faster.
    low_float_kernels: bool = False
    # Serving (edgemm/serving/): the Triton instance kinds its model runs on when Triton serves it natively
    triton_kinds: tuple[str, ...] = ("cpu", "gpu")

    def installed(self) -> bool:
        """Whether this host can open the backend's sessions (its Python package is importable)."""
        import importlib.util

        return bool(self.python_package) and importlib.util.find_spec(self.python_package) is not None

    def package(self, model_path: Path, stage: Path, target, request: PackageRequest) -> dict:
        """Put the deployable artefacts into ``stage``; return the manifest's "backend" section
        (``{"name": self.name, ...}``)."""
        raise NotImplementedError

    def package_part(self, model_path: Path, stage: Path, part: str, folder: str, target, request: PackageRequest, *,
                     precision: str, device: str) -> dict:
        """A split bundle's part (edgemm/split/): its artefacts under ``stage / folder``; returns the part's
        backend fields (paths relative to the bundle). ``precision``: what the part was built in; ``device``:
        its placement (``part_placement``), else the backend's ``device``."""
        raise NotImplementedError(f"{self.title} does not package split parts")

    def split_section(self, stage: Path, parts: list[dict], target, bundle_name: str) -> dict:
        """The top-level backend fields of a split bundle beside ``name`` (``parts``: the pipeline entries)."""
        return {}

    def tune(self, section: dict, stage: Path, feeds: Mapping[str, Any], say: Callable[[str], None]) -> None:
        """Measure run-time settings on this host and record them in ``section`` (compile --tune-threads)."""

    def parity_runner(self, stage: Path, manifest: dict) -> tuple[Run, str | None] | None:
        """(run, simulated-note) to judge the staged bundle on this machine, or None when it cannot run
        here (the report then says to verify on the device). The note says how accuracy was estimated
        when the bundle itself did not run."""
        return None

    def open_session(self, path: Path, manifest: dict, **options):
        """The runtime session for a loaded bundle (``edgemm.runtime.load``): torch-free."""
        raise NotImplementedError

    def runtime_threads(self, section: Mapping) -> int | None:
        """The intra-op thread count the compile recorded for this bundle, None for the runtime's default."""
        if not self.thread_count:
            return None
        threads = section.get("intra_op_threads")
        return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0 else None

    def check_target(self, profile, bad) -> None:
        """Refuse a target profile this backend cannot serve: ``raise bad(field, detail)`` (an InputError
        naming the profile file). Called by ``edgemm.targets`` after the checks that hold for any device."""
        if profile.tensorrt_versions or (profile.sparse_tensor_cores and not self.sparse_kernels):
            raise bad("tensorrt_versions", f"a {self.device.upper()} target has no TensorRT stack or sparse tensor "
                                           "cores")

    # -- serving (edgemm/serving/, ``edgemm export triton``) ---------------------------------------------
    def serving_refusal(self, section: Mapping) -> tuple[str, str, str] | None:
        """(what, field, fix) when no server can serve the bundle as it is (an engine not built yet)."""
        return None

    def triton_platform(self, section: Mapping, bad, notes: list, model: str) -> dict:
        """The config.pbtxt fields of Triton's own backend for this model (``--flavor native``): platform,
        default_model_filename, parameters. ``bad(what, field, fix)`` makes the refusal; ``notes`` collects
        what the user should know; ``model`` names the model in them."""
        raise bad(f"backend {self.name!r} has no Triton platform", "backend.name", "use --flavor edgemm")

    def triton_files(self, section: Mapping, files: Mapping[str, str], part: bool) -> dict[str, str]:
        """The bundle files Triton's own backend reads: {file in the bundle: name in the version folder}.
        ``part``: a split bundle's part (its files are copied flat)."""
        raise NotImplementedError

    def triton_profiles(self, section: Mapping) -> int:
        """How many optimization profiles the instance group names (0: none to name)."""
        return 0

    def rows_mix(self, model_files: list[str], read: Callable[[str], bytes]) -> str | None:
        """Why one row's result depends on the other rows of its batch (then Triton must not merge requests),
        or None. ``model_files``: the bundle's ONNX files; ``read(rel)`` their bytes."""
        return None
