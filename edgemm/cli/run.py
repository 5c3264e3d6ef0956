"""`edgemm run`: the runtime on an .npz of inputs. Imports numpy + onnxruntime only."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..iospec import call_batch, dynamic_batch_input, max_batch
from .options import signature_options, trust_options, verbose_option


@click.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Inputs .npz: keys = input names, axis 0 = samples.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the outputs (.npz).")
@click.option("--batch-size", type=int, default=None,
              help="Samples per call (default 32, or the bundle's largest batch if smaller).")
@signature_options
@verbose_option
def command(bundle, data, output, batch_size, trusted_keys, require_signature):
    """Run BUNDLE on every sample of --data and save the outputs."""
    import numpy as np

    from .. import runtime
    from ..data import check_token_ids, load_dataset
    from ..errors import InputError
    from ..display import printable
    from ..outputs import output_file

    if batch_size is not None and batch_size < 1:
        raise InputError("must be >= 1", field="--batch-size", fix="e.g. --batch-size 32")
    out_path = Path(output)
    _check_output(out_path, bundle, data)  # before the run, which may be long
    b = runtime.load(bundle, **trust_options(trusted_keys, require_signature))
    ds = load_dataset(data, specs=b.inputs, allow_labels=True, role="--data")
    check_token_ids(ds, b.token_vocab)  # naming the file, before any call
    batch_size = batch_size or call_batch(b.inputs, 32)
    chunks: dict[str, list] = {o.name: [] for o in b.outputs}
    sizes = []  # samples in each call
    for batch in ds.batches(batch_size):
        sizes.append(len(next(iter(batch.values()))))
        for name, value in b.run(batch).items():
            chunks[name].append(value)
    out = {}
    for spec in b.outputs:
        parts = chunks[spec.name]
        if len(parts) == 1 or _per_sample(spec, parts, sizes, b.inputs):
            out[spec.name] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            continue
        # An output that relates samples of one call (a [batch, batch] similarity) has no per-sample rows:
        # concatenating calls would be wrong, so each call's output is kept under its own key.
        for i, part in enumerate(parts):
            out[f"{spec.name}.{i}"] = part
        hint = (f"; use --batch-size {ds.num_samples} for one matrix over all samples"
                if dynamic_batch_input(b.inputs) and ds.num_samples <= (max_batch(b.inputs) or ds.num_samples) else "")
        click.echo(printable(f"note: {spec.name} {list(spec.shape)} spans each call's batch: saved per call as "
                             f"{spec.name}.0 .. {spec.name}.{len(parts) - 1} (--batch-size {batch_size}){hint}"),
                   err=True)
    _check_output(out_path, bundle, data)  # again: it may have changed during the run
    with output_file(out_path, field="-o") as f:
        np.savez(f, **out)
    click.echo(printable(f"wrote {out_path}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in out.items())))
    return 0


def _per_sample(spec, parts, sizes, inputs) -> bool:
    """Whether calls' outputs can be stacked row by row: axis 0 is each call's batch, and no other axis is.

    The manifest's symbol names alone cannot tell: a .pt2 export names both axes of a [batch, batch]
    similarity ``batch``, a TorchScript export names them after different tensors
    (``Divimage_embeds_dim_0`` x ``Divtext_embeds_dim_0``). So, with n the call's sample count:
    - axis 0 must be n in every call; if the manifest fixes it to an int, only in a static-batch bundle
      (in a dynamic one a fixed size is not the batch, whatever the call size);
    - a later axis whose size changes between calls follows the batch (or the data): no stacking;
    - a later axis the manifest fixes to an int is never the batch ([batch, 10] at --batch-size 10 is
      still per sample), except an int equal to the static batch of a static-batch bundle (k > 1), where
      [k, k] cannot be told from a similarity: kept per call, which loses nothing;
    - a later symbolic axis follows the batch if its symbol is axis 0's or an input's batch symbol; if
      it is an input's non-batch symbol (a sequence length) it follows that input instead; any other
      symbol (one the exporter made up) follows the batch when its size is n in every call.
    """
    shape = list(spec.shape)
    if not shape or not parts or len(parts) != len(sizes):
        return False
    if any(p.ndim != len(shape) or p.shape[0] != n for p, n in zip(parts, sizes)):
        return False
    static = dynamic_batch_input(inputs) is None
    if isinstance(shape[0], int) and not static:
        return False
    if len({p.shape[1:] for p in parts}) != 1:
        return False
    batch_syms = {s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str)}
    other_syms = {d for s in inputs for d in s.shape[1:] if isinstance(d, str)} - batch_syms
    for axis, dim in enumerate(shape[1:], start=1):
        if isinstance(dim, int):
            if static and dim == shape[0] and dim > 1:
                return False
            continue
        if dim == shape[0] or dim in batch_syms:
            return False
        if dim in other_syms:
            continue
        if all(p.shape[axis] == n for p, n in zip(parts, sizes)):
            return False
    return True


def _check_output(out_path: Path, bundle, data) -> None:
    from ..errors import InputError
    from ..outputs import check_output_file

    if out_path.suffix != ".npz":
        raise InputError("output must end in .npz", field="-o", fix=f"use {out_path.with_suffix('.npz')}")
    check_output_file(out_path, field="-o", inputs={"--data": data, "BUNDLE": bundle})
    if os.path.lexists(out_path) and not out_path.is_file():
        raise InputError("exists and is not a regular file", file=out_path, field="-o",
                         fix="choose another .npz path")
