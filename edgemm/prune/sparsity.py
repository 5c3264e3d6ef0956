"""Semi-structured 2:4 weight sparsity for GPUs with sparse tensor cores (Ampere and newer, incl. Orin).

In every group of 4 consecutive weights along a layer's input (reduction) dimension, 2 are zeroed;
TensorRT then picks sparse kernels when the engine is built with sparse weights enabled (the manifest
records ``sparsity``). Which two survive is chosen with the calibration data: the score of a weight is
``|w| * rms(x)``, its magnitude times the RMS of the input channel it reads (Wanda, Sun et al. 2023),
which keeps the weights that carry the most signal rather than merely the largest ones.

Hand-written rather than ``modelopt.torch.sparsity``: modelopt 0.47's ``modelopt.torch`` package
imports ``requests`` and ``huggingface_hub`` at import time without declaring them, so it cannot be
imported in edgemm's compile environment; the mask itself is a few lines of tensor code.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .importance import ActivationStats

PATTERN = "2:4"
GROUP, KEEP = 4, 2
# Layer shapes TensorRT's sparse kernels accept (the same rule NVIDIA's ASP applies): smaller or
# misaligned layers stay dense.
OUT_MULTIPLE, IN_MULTIPLE = 8, 16


def check_sparsity_target(target, spec: str | bool | None = PATTERN) -> None:
    """Refuse 2:4 sparsity for targets that cannot run it faster (InputError, one line)."""
    if spec in (None, False):
        return
    pattern = PATTERN if spec is True else str(spec)
    if pattern != PATTERN:
        raise InputError(f"unknown sparsity pattern {pattern!r}", field="--sparsity", fix=f"use --sparsity {PATTERN}")
    from ..backends import registry

    backend = registry.get(target.backend)
    if not backend.sparse_kernels:   # a CPU target's backend has none (targets check kind against device)
        raise InputError(f"target {target.name} runs on {backend.title}, which has no sparse kernels: 2:4 "
                         f"sparsity would only cost accuracy", field="--sparsity",
                         fix="drop --sparsity (use --prune to make CPU models smaller and faster), or compile "
                             "for a TensorRT target such as jetson-orin-nano")
    if not target.sparse_tensor_cores:
        raise InputError(f"target {target.name} has no sparse tensor cores, so 2:4 sparsity would not run faster",
                         field="--sparsity", fix="drop --sparsity, or pick an Ampere-or-newer GPU target")


def two_four_mask(scores):
    """Boolean keep-mask of a weight tensor's scores: the 2 best of every 4 along dim 1 (input channels),
    for Linear [out, in] and Conv [out, in, *kernel] weights. dim 1 must be a multiple of 4."""
    import torch

    moved = scores.movedim(1, -1)                       # [..., in]
    groups = moved.reshape(-1, GROUP)
    top = groups.topk(KEEP, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    return keep.reshape(moved.shape).movedim(-1, 1)


def is_two_four(weight) -> bool:
    """True when every group of 4 along dim 1 holds at least 2 zeros."""
    groups = weight.detach().movedim(1, -1).reshape(-1, GROUP)
    return bool(((groups == 0).sum(dim=1) >= GROUP - KEEP).all())


def eligible(layer) -> str | None:
    """None when ``layer`` can take 2:4 sparsity, else why not."""
    from torch import nn

    if isinstance(layer, nn.Linear):
        out_f, in_f = layer.out_features, layer.in_features
    elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if layer.groups != 1:
            return "grouped convolution"
        out_f, in_f = layer.out_channels, layer.in_channels
    else:
        return "not a Linear/Conv layer"
    if out_f % OUT_MULTIPLE or in_f % IN_MULTIPLE:
        return f"shape {out_f}x{in_f} is not a multiple of {OUT_MULTIPLE}x{IN_MULTIPLE}"
    return None


def apply_2to4(module, calib: Mapping[str, np.ndarray], *, input_names: Sequence[str] | None = None) -> dict:
    """Zero 2 of every 4 weights (in place) in each eligible Linear/Conv layer of ``module``.

    Returns a report: pattern, method, layers made sparse, layers left dense (with reasons), and the
    fraction of all Linear/Conv weights that are now zero. Record ``report["manifest"]`` in the bundle.
    """
    import torch
    from torch import nn

    from .structured import ordered_input_names

    names = list(input_names) if input_names else ordered_input_names(module, calib)
    module.eval()
    stats = ActivationStats().collect(module, names, calib)
    sparse, dense = [], {}
    zeros = total = 0
    for path, layer in module.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        why = eligible(layer)
        if why is None:
            with torch.no_grad():
                scores = layer.weight.detach().abs().float()
                rms = stats.rms(layer)
                if rms is not None:  # layer ran on the calibration data: weight by its input's RMS
                    scores = scores * rms.reshape((1, -1) + (1,) * (scores.ndim - 2))
                layer.weight.mul_(two_four_mask(scores).to(layer.weight.dtype))
            sparse.append(path)
        else:
            dense[path] = why
        zeros += int((layer.weight == 0).sum())
        total += layer.weight.numel()
    if not sparse:
        raise InputError("no layer can take 2:4 sparsity (Linear/Conv weights must be multiples of "
                         f"{OUT_MULTIPLE}x{IN_MULTIPLE})", field="--sparsity", fix="drop --sparsity for this model")
    return {
        "pattern": PATTERN, "method": "activation-weighted magnitude (Wanda) on the calibration data",
        "layers": sparse, "dense_layers": dense, "zero_fraction": zeros / max(total, 1),
        "manifest": {"pattern": PATTERN, "sparse_layers": len(sparse), "tensorrt_sparse_weights": True},
    }
