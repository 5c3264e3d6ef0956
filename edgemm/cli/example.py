"""`edgemm example`: the reference zoo models with their calibration and evaluation data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .options import verbose_option

SIDECAR = "edgemm-example.json"
# Everything `edgemm example` writes into its folder: only these are ever replaced (with --force).
EXAMPLE_FILES = ("model.pt", "model.pt2", "calib.npz", "eval.npz", SIDECAR, "prompts.npz", "prompts.txt")


@click.command("example")
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Path(), help="Folder to write (default examples/<name>).")
@click.option("--calib-size", type=click.IntRange(1, 100_000), default=None,
              help="Calibration samples to write (default 128; about 1000 for pruning with --recover).")
@click.option("--list", "list_", is_flag=True, help="List the zoo models.")
@click.option("--force", is_flag=True,
              help="Replace files named like example files in a folder that is not an earlier example.")
@verbose_option
def command(name, output, calib_size, list_, force):
    """Write zoo model NAME as DIR/model.pt, model.pt2, calib.npz and eval.npz (dual-encoder: also the
    zero-shot prompts.npz and prompts.txt)."""
    from .. import zoo
    from ..errors import InputError
    from ..runtime.atomic import write_text_atomic

    if list_ or not name:
        if not list_:
            raise InputError("missing NAME", field="NAME", fix="edgemm example --list")
        for n in zoo.names():
            m = zoo.get(n)
            click.echo(f"{n:16s} {m.fusion:16s} metric {m.metric:9s} fp32 {m.fp32_metric:6.2f}  {m.description}")
        return 0
    entry = zoo.get(name)
    default = Path("examples") / name
    out = Path(output or default)
    _prepare_folder(out, force=force, default=default)
    try:
        paths = zoo.write_example(name, out, calib_size=calib_size)
        from ..zoo.prompts import write_prompts

        paths.update(write_prompts(name, out))   # zero-shot prompts (dual-encoder): prompts.npz, prompts.txt
        write_text_atomic(out / SIDECAR, json.dumps({
            "zoo": name, "metric": entry.metric, "metric_outputs": list(entry.metric_outputs),
            "outputs": list(entry.outputs), "fp32_metric": entry.fp32_metric}, indent=2) + "\n")
    except OSError as exc:  # disk full, permissions changed, a folder put in a file's place meanwhile
        raise InputError(f"cannot write the example ({exc.strerror or exc})", file=out, field="-o",
                         fix="choose a writable folder") from exc
    for key, p in paths.items():
        click.echo(f"wrote {p}")
    return 0


def _prepare_folder(out: Path, *, force: bool, default: Path) -> None:
    """-o is a folder: new, empty, an earlier example's, or without example files; with --force, one whose
    example-named files may be replaced (not a folder in one's place). Other files in it are left alone."""
    from ..errors import InputError

    if os.path.lexists(out) and not out.is_dir():
        what = "is a file" if out.is_file() else "exists and is not a folder"
        raise InputError(f"{what}; -o names the folder to write the example into", file=out, field="-o",
                         fix=f"choose a new or empty folder, e.g. -o {default}")
    present = [f for f in EXAMPLE_FILES if os.path.lexists(out / f)]
    # A folder this command wrote before (its sidecar is there) is rewritten: re-running the README's
    # quick start, or asking for a bigger --calib-size, must just work. Files of the same names without
    # the sidecar may be the user's own.
    ours = (out / SIDECAR).is_file() and not (out / SIDECAR).is_symlink()
    if present and not force and not ours:
        raise InputError(f"already exists and holds example files ({', '.join(present)})", file=out, field="-o",
                         fix="pass --force to replace it, or choose another -o")
    for f in present:  # a file (or link) is replaced in one rename; a folder in its place is not
        if (out / f).is_dir() and not (out / f).is_symlink():
            raise InputError("is a folder, so --force will not replace it", file=out / f, field="-o",
                             fix="move it away, or choose another -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent folder should be, no permission
        raise InputError(f"cannot create the folder ({exc.strerror or exc})", file=out, field="-o",
                         fix="choose a folder path whose parents are folders you can write to") from exc
