"""Channel importance measured on the calibration data, without labels.

A channel's importance is what it feeds forward: the RMS of its activation over the calibration set
times the norm of the weights that read it (for each consumer Linear/Conv input channel), summed over
every consumer in the channel's dependency group. This is the structured form of Wanda's
``|W| * ||X||`` score; it needs only forward passes, so the unlabeled ``--calib`` data suffices.
Hand-written because torch-pruning's ``ActivationImportance`` ignores the weights and Conv1d.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from ..signature import call_module

CALIB_BATCH = 32


class ActivationStats:
    """Per-input-channel activation RMS of every Linear / Conv layer, keyed by the layer object."""

    def __init__(self):
        self._sumsq: dict = {}
        self._count: dict = {}

    def rms(self, layer):
        """RMS of each input channel of ``layer`` (a 1-D tensor), or None if it never ran."""
        import torch

        if layer not in self._sumsq:
            return None
        return torch.sqrt(self._sumsq[layer] / max(self._count[layer], 1))

    def rekeyed(self, source, copy) -> "ActivationStats":
        """The same statistics keyed by the layers of ``copy`` (a deep copy of ``source``)."""
        by_path = dict(source.named_modules())
        moved = ActivationStats()
        for path, layer in copy.named_modules():
            original = by_path.get(path)
            if original in self._sumsq:
                moved._sumsq[layer] = self._sumsq[original]
                moved._count[layer] = self._count[original]
        return moved

    def collect(self, module, input_names: Sequence[str], calib: Mapping[str, np.ndarray],
                batch: int = CALIB_BATCH) -> "ActivationStats":
        import torch
        from torch import nn

        layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]

        def hook(layer, inputs, _out):
            x = inputs[0].detach().float()
            if isinstance(layer, nn.Linear):
                flat = x.reshape(-1, x.shape[-1])
            else:  # [B, C, ...] -> [C, B*...]
                flat = x.transpose(0, 1).reshape(x.shape[1], -1).t()
            self._sumsq[layer] = self._sumsq.get(layer, 0) + flat.pow(2).sum(0)
            self._count[layer] = self._count.get(layer, 0) + flat.shape[0]

        handles = [layer.register_forward_hook(hook) for layer in layers]
        try:
            with torch.no_grad():
                for args in batches(input_names, calib, batch):
                    call_module(module, input_names, args)
        finally:
            for h in handles:
                h.remove()
        return self


def batches(input_names: Sequence[str], data: Mapping[str, np.ndarray], batch: int) -> Iterable[tuple]:
    import torch

    n = len(data[input_names[0]])
    for start in range(0, n, batch):
        yield tuple(torch.from_numpy(np.ascontiguousarray(data[k][start:start + batch])) for k in input_names)


def input_column_norms(layer):
    """L2 norm of the weights reading each input channel of a Linear / Conv layer."""
    w = layer.weight.detach().float()
    groups = getattr(layer, "groups", 1)
    if groups > 1:
        # Grouped/depthwise conv: input channel g*ipg + p is read by slot p of group g's filters only.
        out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
        return w.reshape(groups, out_per_group, in_per_group, -1).pow(2).sum(dim=(1, 3)).sqrt().reshape(-1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).pow(2).sum(1).sqrt()


def channel_scores(layer, stats: ActivationStats):
    """Importance of each input channel of ``layer``: activation RMS x weight column norm."""
    rms = stats.rms(layer)
    norms = input_column_norms(layer)
    if rms is None or rms.shape != norms.shape:
        return norms
    return rms * norms


def group_importance(group, stats: ActivationStats, in_channel_fns):
    """Importance per root channel of a torch-pruning group: summed over the group's consumers."""
    import torch

    size = len(group[0].idxs)
    total = torch.zeros(size, dtype=torch.float64)
    found = False
    for item in group:
        dep, idxs = item.dep, item.idxs
        if dep.handler not in in_channel_fns:
            continue
        roots = item.root_idxs
        if any(r is None for r in roots):
            continue
        scores = channel_scores(dep.target.module, stats)[list(idxs)].double()
        total.scatter_add_(0, torch.tensor(roots, dtype=torch.long), scores)
        found = True
    if not found:  # no consumer seen: fall back to the producer's output-row norms
        root = group[0].dep.target.module
        w = root.weight.detach().float()
        total = w.reshape(w.shape[0], -1).pow(2).sum(1).sqrt().double()[list(group[0].idxs)]
    return total
