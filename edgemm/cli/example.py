"""`edgemm example`: the reference zoo models with their calibration and evaluation data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .options import verbose_option


@click.command("example")
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Path(), help="Folder to write (default examples/<name>).")
@click.option("--calib-size", type=click.IntRange(1, 100_000), default=None,
              help="Calibration samples to write (default 128; about 1000 for pruning with --recover).")
@click.option("--list", "list_", is_flag=True, help="List the zoo models.")
@verbose_option
def command(name, output, calib_size, list_):
    """Write zoo model NAME as DIR/model.pt, model.pt2, calib.npz and eval.npz."""
    from .. import zoo
    from ..errors import InputError

    if list_ or not name:
        if not list_:
            raise InputError("missing NAME", field="NAME", fix="edgemm example --list")
        for n in zoo.names():
            m = zoo.get(n)
            click.echo(f"{n:16s} {m.fusion:16s} metric {m.metric:9s} fp32 {m.fp32_metric:6.2f}  {m.description}")
        return 0
    entry = zoo.get(name)
    out = Path(output or Path("examples") / name)
    paths = zoo.write_example(name, out, calib_size=calib_size)
    sidecar = out / "edgemm-example.json"
    tmp = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"zoo": name, "metric": entry.metric, "metric_outputs": list(entry.metric_outputs),
                               "outputs": list(entry.outputs),
                               "fp32_metric": entry.fp32_metric}, indent=2) + "\n")
    os.replace(tmp, sidecar)
    for key, p in paths.items():
        click.echo(f"wrote {p}")
    return 0
