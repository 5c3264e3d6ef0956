"""`edgemm export triton`: bundles as a Triton Inference Server model repository.

    edgemm export triton engines/vqa engines/clip -o model_repository/ --max-queue-delay-us 2000
"""

from __future__ import annotations

from pathlib import Path

import click

from .options import signature_options, verbose_option


@click.group("export")
def command():
    """Export bundles for a serving system (Triton Inference Server)."""


@command.command("triton")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The model repository to write.")
@click.option("--flavor", type=click.Choice(["edgemm", "native"]), default="edgemm", show_default=True,
              help="edgemm: python backend running edgemm.runtime (hash/signature checks, the bundle's session "
                   "settings); native: Triton's onnxruntime_onnx / tensorrt_plan platforms.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="max_batch_size, at most the bundle's batch bound [default: the bound].")
@click.option("--instances", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Model instances (instance_group count).")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Where the instances run [default: where the bundle's runtime runs].")
@click.option("--preferred-batch", type=click.IntRange(min=1), multiple=True,
              help="A batch size the dynamic batcher should prefer (repeatable).")
@click.option("--max-queue-delay-us", type=click.IntRange(0, 60_000_000), default=0, show_default=True,
              help="How long the dynamic batcher may hold a request to form a larger batch.")
@click.option("--monitor", is_flag=True, help="Publish the runtime monitor's input checks (out of calibration range, "
                                             "NaN/Inf, unknown tokens, drift windows) as Triton metrics.")
@click.option("--force", is_flag=True, help="Replace an existing repository written by this command.")
@signature_options
@verbose_option
def triton(bundles, output, flavor, max_batch, instances, kind, preferred_batch, max_queue_delay_us, monitor, force,
           trusted_keys, require_signature):
    """Write a Triton model repository serving BUNDLES (one model each, named by the bundle folder)."""
    from ..serving import TritonOptions, export_triton

    options = TritonOptions(flavor=flavor, max_batch=max_batch, instances=instances, kind=kind,
                            preferred_batch=tuple(preferred_batch), max_queue_delay_us=max_queue_delay_us,
                            require_signature=require_signature, monitor=monitor)
    repo = export_triton(bundles, output, options, force=force, trusted_keys=list(trusted_keys) or None,
                         say=lambda m: click.echo(m, err=True))
    import json

    from ..serving.triton_repo import REPO_MARKER

    served = json.loads((repo / REPO_MARKER).read_text())["models"]   # a split bundle: ensemble + parts
    count = sum(len(entry["models"]) for entry in served.values())
    click.echo(f"wrote {repo}: {count} model(s) from {len(bundles)} bundle(s), flavor {flavor}; serve it with "
               f"tritonserver --model-repository={repo}")
    return 0
