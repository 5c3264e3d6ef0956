"""`edgemm targets [NAME]`: the device profiles compile can target."""

from __future__ import annotations

import json

import click

from .options import verbose_option


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _mb(value) -> str:
    if value is None:
        return "host"
    return f"{value // 1024} GB" if value >= 1024 and value % 1024 == 0 else f"{value} MB"


def _summary_rows(profiles) -> list[list[str]]:
    rows = [["NAME", "KIND", "BACKEND", "CC", "PRECISIONS", "DEFAULT", "DLA", "MEMORY", "TENSORRT", "SPARSE"]]
    for t in profiles:
        rows.append([t.name, t.kind, t.backend, t.compute_capability or "-", ",".join(t.precisions),
                     t.default_precision, str(t.dla_cores), _mb(t.memory_mb),
                     ",".join(t.tensorrt_versions) or "-", "2:4" if t.sparse_tensor_cores else "-"])
    return rows


def _detail(t) -> str:
    rows = [
        ("name", t.name), ("description", t.description), ("kind", t.kind), ("backend", t.backend),
        ("compute capability", t.compute_capability or "-"), ("precisions", ", ".join(t.precisions)),
        ("default precision", t.default_precision), ("DLA cores", str(t.dla_cores)),
        ("memory", _mb(t.memory_mb)), ("TensorRT workspace", _mb(t.workspace_mb) if t.workspace_mb else "-"),
        ("TensorRT versions", ", ".join(t.tensorrt_versions) or "-"), ("JetPack", t.jetpack or "-"),
        ("sparse tensor cores", "yes (2:4)" if t.sparse_tensor_cores else "no"), ("notes", t.notes or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@click.command(name="targets")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@verbose_option
def command(name, as_json):
    """List target device profiles, or show one in full."""
    from .. import targets

    if name:
        profile = targets.load(name)
        click.echo(json.dumps(profile.to_dict(), indent=2) if as_json else _detail(profile))
        return 0
    profiles = targets.all_targets()
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in profiles], indent=2))
    else:
        click.echo(_table(_summary_rows(profiles)))
    return 0
