"""`edgemm run`: the runtime on an .npz of inputs. Imports numpy + onnxruntime only."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .options import verbose_option


@click.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Inputs .npz: keys = input names, axis 0 = samples.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the outputs (.npz).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per call.")
@verbose_option
def command(bundle, data, output, batch_size):
    """Run BUNDLE on every sample of --data and save the outputs."""
    import numpy as np

    from .. import runtime
    from ..data import load_dataset
    from ..errors import InputError

    if batch_size < 1:
        raise InputError("must be >= 1", field="--batch-size", fix="e.g. --batch-size 32")
    b = runtime.load(bundle)
    ds = load_dataset(data, specs=b.inputs, allow_labels=True, role="--data")
    chunks: dict[str, list] = {o.name: [] for o in b.outputs}
    for batch in ds.batches(batch_size):
        for name, value in b.run(batch).items():
            chunks[name].append(value)
    out = {}
    for name, parts in chunks.items():
        try:
            out[name] = np.concatenate(parts, axis=0)
        except ValueError:  # outputs like [B, B] similarity do not stack across batches
            out[name] = np.stack(parts) if len({p.shape for p in parts}) == 1 else parts[0]
    out_path = Path(output)
    if out_path.suffix != ".npz":
        raise InputError("output must end in .npz", field="-o", fix=f"use {out_path.with_suffix('.npz')}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **out)
    os.replace(tmp, out_path)
    click.echo(f"wrote {out_path}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in out.items()))
    return 0
