"""TensorRT backend: build options, trtexec command lines, the Python-API engine builder and bundle
packaging (portable bundles finished on the device by ``edgemm build``).

Importing this package never imports TensorRT; ``build_engine`` does, lazily."""

from .options import HARDWARE_COMPATIBILITY, TensorRTOptions, options_for_target, profile_shapes_from_inputs
from .package import check_options_for_target, finish_portable_bundle, package
from .trtexec import build_script, render_command, trtexec_command


def build_engine(*args, **kwargs):
    """See edgemm.backends.tensorrt.builder.build_engine (imported on call)."""
    from .builder import build_engine as _build
    return _build(*args, **kwargs)


__all__ = ["TensorRTOptions", "HARDWARE_COMPATIBILITY", "options_for_target", "profile_shapes_from_inputs",
           "trtexec_command", "render_command", "build_script", "build_engine", "package",
           "finish_portable_bundle", "check_options_for_target"]
