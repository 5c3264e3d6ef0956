"""`edgemm build BUNDLE`: turn a portable TensorRT bundle into an engine on the device (or rebuild one
after a TensorRT upgrade). Needs the TensorRT Python package, cuda-python and the target GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .options import signature_options, trust_options, verbose_option


@click.command(name="build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="Timing cache file (default $EDGEMM_TIMING_CACHE_DIR or ~/.cache/edgemm/timing/"
                   "cc<cc>-trt<MMmmpp>.cache, shared with build.sh).")
@click.option("--from-engine", type=click.Path(path_type=Path),
              help="Adopt an engine build.sh (trtexec) built on this device instead of building one.")
@click.option("--refit", "refit_onnx", type=click.Path(path_type=Path),
              help="Swap the weights of a refittable engine from this ONNX (same network), without a rebuild.")
@signature_options
@verbose_option
def command(bundle, timing_cache, from_engine, refit_onnx, trusted_keys, require_signature):
    """Build the TensorRT engine of BUNDLE here and record it in its manifest."""
    from ..backends.tensorrt.package import adopt_engine, finish_portable_bundle

    if logging.getLogger("edgemm").isEnabledFor(logging.INFO):
        logging.getLogger("edgemm.tensorrt").setLevel(logging.DEBUG)
    from ..runtime.signing import SIGNATURE_NAME, is_signed

    if timing_cache is not None:  # written after the build: never a file of the bundle or an input
        from ..outputs import check_output_file

        check_output_file(timing_cache, field="--timing-cache",
                          inputs={"BUNDLE": bundle, "--from-engine": from_engine, "--refit": refit_onnx})
    if from_engine is not None and refit_onnx is not None:
        from ..errors import InputError

        raise InputError("--from-engine and --refit cannot be combined", field="--refit",
                         fix="adopt the engine first, then refit it")
    if refit_onnx is not None:
        from ..backends.tensorrt.refit import refit_bundle

        refit_bundle(bundle, refit_onnx, **trust_options(trusted_keys, require_signature))
        click.echo(f"refitted the engine of {bundle} with the weights of {refit_onnx}")
    elif from_engine is not None:
        built = adopt_engine(bundle, from_engine, **trust_options(trusted_keys, require_signature))
        click.echo(f"adopted {from_engine} (TensorRT {built['tensorrt_version']}, {built['gpu']}, "
                   f"{built['smoke_ms']} ms per run on zero inputs)")
    else:
        engines = finish_portable_bundle(bundle, timing_cache=timing_cache,
                                         **trust_options(trusted_keys, require_signature))
        for engine in engines if isinstance(engines, list) else [engines]:   # a split bundle: one per part
            click.echo(f"built {engine} ({engine.stat().st_size / 1e6:.1f} MB)")
    if is_signed(bundle):
        click.echo(f"note: {bundle / SIGNATURE_NAME} no longer covers the rebuilt manifest and engine: re-sign the "
                   f"bundle here (`edgemm sign {bundle} --key KEY --force`) before loading it with --trusted-key",
                   err=True)
    return 0
