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
    out_path = Path(output)
    _check_output(out_path)  # before the run, which may be long
    b = runtime.load(bundle)
    ds = load_dataset(data, specs=b.inputs, allow_labels=True, role="--data")
    chunks: dict[str, list] = {o.name: [] for o in b.outputs}
    for batch in ds.batches(batch_size):
        for name, value in b.run(batch).items():
            chunks[name].append(value)
    out = {}
    for spec in b.outputs:
        parts = chunks[spec.name]
        if len(parts) == 1 or _per_sample(spec, parts):
            out[spec.name] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            continue
        # An output that relates samples of one call (a [batch, batch] similarity) has no per-sample rows:
        # concatenating calls would be wrong, so each call's output is kept under its own key.
        for i, part in enumerate(parts):
            out[f"{spec.name}.{i}"] = part
        click.echo(f"note: {spec.name} {list(spec.shape)} spans each call's batch: saved per call as "
                   f"{spec.name}.0 .. {spec.name}.{len(parts) - 1} (--batch-size {batch_size}); use "
                   f"--batch-size {ds.num_samples} for one matrix over all samples", err=True)
    _check_output(out_path)  # again: it may have changed during the run
    made = [p for p in [out_path.parent, *out_path.parent.parents] if not p.exists()]
    tmp = out_path.with_name(f".{out_path.stem}.tmp-{os.getpid()}.npz")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **out)
        os.replace(tmp, out_path)
    except OSError as exc:  # a folder appeared at -o, disk full, no permission: leave nothing behind
        _remove_quietly(tmp)
        for folder in made:  # innermost first; stops at the first one not empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise InputError(f"cannot write the outputs ({exc.strerror or exc})", file=out_path, field="-o",
                         fix="choose a writable .npz path that is not a folder") from exc
    except BaseException:  # Ctrl-C, SIGTERM mid-write
        _remove_quietly(tmp)
        raise
    click.echo(f"wrote {out_path}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in out.items()))
    return 0


def _per_sample(spec, parts) -> bool:
    """Axis 0 is the batch and no other axis is (else the output mixes samples of one call)."""
    shape = list(spec.shape)
    if not shape or not isinstance(shape[0], str) or shape[0] in shape[1:]:
        return False
    return len({p.shape[1:] for p in parts}) == 1


def _check_output(out_path: Path) -> None:
    from ..errors import InputError

    if out_path.suffix != ".npz":
        raise InputError("output must end in .npz", field="-o", fix=f"use {out_path.with_suffix('.npz')}")
    if out_path.is_dir():
        raise InputError("is a folder; -o names the .npz file to write", file=out_path, field="-o",
                         fix=f"use a file path such as {out_path / 'outputs.npz'}")
    if os.path.lexists(out_path) and not out_path.is_file():
        raise InputError("exists and is not a regular file", file=out_path, field="-o",
                         fix="choose another .npz path")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
