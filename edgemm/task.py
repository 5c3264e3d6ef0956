"""The task a model is judged on, in one place: which metric and which outputs (from the zoo sidecar,
the manifest, the user's --metric, or guessed from the output names and heads), and the metric itself.
numpy only, low in the import graph (compile, verify, prune and the accuracy search all read it; usable on
a device without torch).

``compute(metric, outputs, labels, output_names)`` returns a percentage:
- ``top1``: argmax of ``outputs[output_names[0]]`` (logits [N, C]) equals ``labels``.
- ``recall@1``: image->text retrieval. ``output_names[0]`` / ``[1]`` are image / text embeddings
  [N, D]; both are L2-normalised here, and sample i counts as correct when the caption it retrieves
  (highest cosine over all N captions) carries the same label (same caption meaning), i.e.
  ``labels[argmax_j sim(i, j)] == labels[i]``.
Rows containing NaN or inf count as wrong rather than raising: a broken engine must score low in a
parity report, not crash it.

A task is the pair ``(metric, [output names])``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .errors import InputError

KNOWN_METRICS = ("top1", "recall@1")
_OUTPUTS_NEEDED = {"top1": 1, "recall@1": 2}
# Similarity rows per chunk: bounds memory at N x 1024 floats for large retrieval sets.
_CHUNK = 1024


Task = tuple  # (metric, [output names])


def from_sidecar(data) -> dict | None:
    """The manifest's ``task`` section from a zoo sidecar's fields (metric, metric_outputs, zoo), or None
    when the sidecar names no task."""
    try:
        return {"metric": data["metric"], "outputs": list(data["metric_outputs"]), "zoo": data.get("zoo")}
    except (TypeError, KeyError):
        return None


def of_section(section) -> tuple[str, list[str]] | None:
    """(metric, outputs) of a manifest ``task`` section (a dict, or the manifest's typed TaskInfo)."""
    if not section:
        return None
    if isinstance(section, tuple):   # (metric, outputs or None), as callers pass a task around
        return section[0], list(section[1] or [])
    if isinstance(section, Mapping):
        return section["metric"], list(section["outputs"])
    return section.metric, list(section.outputs)


def guess(output_names: Sequence[str], heads: Mapping[str, bool] | None = None) -> tuple[str, list[str]] | None:
    """A task metric for labelled data, when no zoo entry or --metric says otherwise: top-1 on the first
    output a linear head makes (``heads``, parity/output_kinds.py; whatever it is called), else
    image-to-text recall@1 for the CLIP convention's embedding outputs."""
    names = list(output_names)
    scored = [n for n in names if (heads or {}).get(n)]
    if scored:
        return "top1", [scored[0]]
    if "image_embeds" in names and "text_embeds" in names:
        return "recall@1", ["image_embeds", "text_embeds"]
    return None


def check_metric(metric: str, *, field: str = "--metric") -> str:
    if metric not in KNOWN_METRICS:
        raise InputError(f"unknown metric {metric!r}", field=field, fix=f"use one of {', '.join(KNOWN_METRICS)}")
    return metric


def outputs_for(metric: str, output_names: Sequence[str], *, known=None, heads=None,
                top1_fallback: Sequence[str] = ()) -> list[str] | None:
    """The outputs ``metric`` reads when the user named none: the known task's (zoo sidecar, manifest)
    when it is that metric, else the guessed task's, else for top-1 the first of ``top1_fallback``."""
    known = of_section(known)
    if known is not None and known[0] == metric and known[1]:
        return list(known[1])
    guessed = guess(output_names, heads)
    if guessed is not None and guessed[0] == metric:
        return guessed[1]
    if metric == "top1" and top1_fallback:
        return [top1_fallback[0]]
    return None


def resolve(output_names: Sequence[str], *, metric: str | None = None, metric_outputs=None, known=None,
            heads=None) -> tuple[str, list[str]] | None:
    """The task to score: ``metric`` (with ``metric_outputs``, or the outputs it reads by default) when
    the user named one; else the known task; else a guess (None: no task metric)."""
    if metric:
        check_metric(metric)
        outs = metric_outputs or outputs_for(metric, output_names, known=known, heads=heads,
                                             top1_fallback=list(output_names) if len(output_names) == 1 else ())
        if not outs:
            raise InputError(f"cannot tell which outputs {metric} reads", field="--metric-outputs",
                             fix=f"pass --metric-outputs from: {', '.join(output_names)}")
        return metric, list(outs)
    return of_section(known) or guess(output_names, heads)


def compute(metric: str, outputs: Mapping[str, np.ndarray], labels: np.ndarray,
            output_names: Sequence[str]) -> float:
    """Task metric in percent (0-100). Raises InputError on unknown metric, missing output or bad shape."""
    if metric not in KNOWN_METRICS:
        raise InputError(f"unknown task metric {metric!r}", field="metric",
                         fix=f"use one of {', '.join(KNOWN_METRICS)}")
    needed = _OUTPUTS_NEEDED[metric]
    if len(output_names) < needed:
        raise InputError(f"metric {metric} reads {needed} outputs, got {list(output_names)}",
                         field="metric_outputs", fix=f"name {needed} model outputs for {metric}")
    labels = _labels(labels)
    arrays = [_output(outputs, name, labels.shape[0]) for name in output_names[:needed]]
    if metric == "top1":
        return _top1(arrays[0], labels)
    image, text = arrays
    if image.shape[1] != text.shape[1]:
        raise InputError(f"embedding widths differ: {output_names[0]} has {image.shape[1]}, "
                         f"{output_names[1]} has {text.shape[1]}", field=f"outputs[{output_names[1]!r}]",
                         fix="pass the image and text embeddings of the same model")
    return _recall_at_1(image, text, labels)


def _labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be a non-empty 1-D integer array, got {labels.dtype}{list(labels.shape)}",
                         field="labels", fix="store int64 labels of shape [N] under the key 'labels'")
    return labels


def _output(outputs: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    if name not in outputs:
        raise InputError(f"output {name!r} is missing (have {sorted(outputs)})", field=f"outputs[{name!r}]",
                         fix="check the model's output names against the metric's metric_outputs")
    array = np.asarray(outputs[name])
    if array.ndim != 2 or array.shape[0] != n or array.shape[1] == 0:
        raise InputError(f"output {name!r} must be [N={n}, C>0], got {list(array.shape)}",
                         field=f"outputs[{name!r}]", fix="run the model on the whole eval set, batch on axis 0")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"output {name!r} has non-real dtype {array.dtype}", field=f"outputs[{name!r}]",
                         fix="pass the model's float outputs")
    return array.astype(np.float64, copy=False)


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    finite = np.isfinite(logits).all(axis=1)
    correct = (logits.argmax(axis=1) == labels) & finite
    return float(100.0 * correct.mean())


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _recall_at_1(image: np.ndarray, text: np.ndarray, labels: np.ndarray) -> float:
    finite_image = np.isfinite(image).all(axis=1)
    finite_text = np.isfinite(text).all(axis=1)
    if not finite_text.any():
        return 0.0
    image = _normalise(np.where(finite_image[:, None], image, 0.0))
    text = _normalise(np.where(finite_text[:, None], text, 0.0))
    correct = np.zeros(labels.shape[0], dtype=bool)
    for start in range(0, labels.shape[0], _CHUNK):
        sim = image[start:start + _CHUNK] @ text.T
        sim[:, ~finite_text] = -np.inf  # a broken caption embedding can never be retrieved
        best = sim.argmax(axis=1)
        correct[start:start + _CHUNK] = labels[best] == labels[start:start + _CHUNK]
    return float(100.0 * (correct & finite_image).mean())
