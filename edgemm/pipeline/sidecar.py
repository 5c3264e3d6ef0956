"""The zoo example's sidecar (``edgemm-example.json`` beside a model written by `edgemm example`): the
output names and task metric it names, and --output-names."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import CompileConfig
from ..errors import InputError
from ..frontends import LoadedModel


EXAMPLE_SIDECAR = "edgemm-example.json"   # written by `edgemm example`: names the zoo model and its metric


def chosen_output_names(cfg: CompileConfig, loaded: LoadedModel) -> list[str] | None:
    """--output-names, else the zoo example's names; otherwise dict keys or output_<i>."""
    if cfg.output_names:
        names = [n.strip() for n in cfg.output_names.split(",")]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise InputError(f"names must be non-empty and distinct: {cfg.output_names!r}", field="--output-names",
                             fix="e.g. --output-names image_embeds,text_embeds,logits")
        return names
    sidecar = read_sidecar(loaded)
    return list(sidecar["outputs"]) if sidecar and sidecar.get("outputs") else None


def read_sidecar(loaded: LoadedModel) -> dict | None:
    if loaded.format == "factory":
        return None
    path = Path(loaded.source).parent / EXAMPLE_SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except ValueError:
        return None


def find_task(loaded: LoadedModel) -> dict | None:
    from ..task import from_sidecar

    return from_sidecar(read_sidecar(loaded))
