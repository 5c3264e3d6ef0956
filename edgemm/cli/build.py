"""`edgemm build BUNDLE`: turn a portable TensorRT bundle into an engine on the device (or rebuild one
after a TensorRT upgrade). Needs the TensorRT Python package, cuda-python and the target GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .options import verbose_option


@click.command(name="build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="Timing cache file (default ~/.cache/edgemm/timing/<gpu>-<cc>-trt<version>.cache).")
@verbose_option
def command(bundle, timing_cache):
    """Build the TensorRT engine of BUNDLE here and record it in its manifest."""
    from ..backends.tensorrt.package import finish_portable_bundle

    if logging.getLogger("edgemm").isEnabledFor(logging.INFO):
        logging.getLogger("edgemm.tensorrt").setLevel(logging.DEBUG)
    engine = finish_portable_bundle(bundle, timing_cache=timing_cache)
    click.echo(f"built {engine} ({engine.stat().st_size / 1e6:.1f} MB)")
    return 0
