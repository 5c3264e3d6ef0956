"""Batch augmentation for recovery: new inputs made from calibration samples, for the teacher to label."""

from __future__ import annotations

from typing import Mapping, Sequence

TOKEN_SWAP = 0.25   # fraction of sequence positions taken from another sample in augmented rows


def mix(rng, args, n, data, names, batch, groups):
    """Augment the second half of the batch with other calibration samples (the teacher labels
    whatever it is shown, so the inputs need not keep their meaning, only their kind):

    - images [B, C, H, W]: a random box pasted from another image (CutMix), then a horizontal flip for
      half of them; other float inputs with a time/space axis ([B, C, T]): a random span pasted;
    - flat float inputs: mixup with another sample (weight 0.5-1 on their own);
    - integer sequences (token ids with their masks): a quarter of the positions from another sample,
      the same positions for every input of the modality, so ids and masks stay aligned and every id
      stays a valid one.
    """
    import torch

    half = batch // 2
    rows = batch - half
    if rows < 1:
        return args
    by_name = dict(zip(names, args))
    out = dict(by_name)
    for group in groups:
        data_rows = torch.from_numpy(rng.choice(n, size=rows, replace=True))
        swap = None
        boxes = {}
        for name in group:
            x = by_name[name].clone()
            other = data[name][data_rows]
            if x.is_floating_point() and x.ndim >= 3:
                key = tuple(x.shape[2:])
                if key not in boxes:  # the same box for every input of the modality with this shape
                    boxes[key] = _random_boxes(rng, rows, key)
                for r, box in enumerate(boxes[key]):
                    x[half + r][(slice(None),) + box] = other[r][(slice(None),) + box]
                if x.ndim == 4:
                    flip = torch.from_numpy(rng.random(rows) < 0.5)
                    x[half:][flip] = x[half:][flip].flip(-1)
            elif x.is_floating_point():
                lam = torch.from_numpy(rng.uniform(0.5, 1.0, size=rows)).to(x.dtype)
                lam = lam.reshape((-1,) + (1,) * (x.ndim - 1))
                x[half:] = lam * x[half:] + (1 - lam) * other
            elif x.ndim >= 2:
                if swap is None or swap.shape != x[half:].shape[:2]:
                    swap = torch.from_numpy(rng.random(size=(rows, x.shape[1])) < TOKEN_SWAP)
                mask = swap.reshape(swap.shape + (1,) * (x.ndim - 2)).expand_as(x[half:])
                x[half:] = torch.where(mask, other, x[half:])
            out[name] = x
    return tuple(out[name] for name in names)


def _random_boxes(rng, rows: int, dims: tuple) -> list[tuple]:
    """Per row, a box covering 25-50% of each trailing axis at a random place (slices per axis)."""
    boxes = []
    for _ in range(rows):
        box = []
        for size in dims:
            length = max(1, int(round(size * rng.uniform(0.25, 0.5))))
            start = int(rng.integers(0, size - length + 1))
            box.append(slice(start, start + length))
        boxes.append(tuple(box))
    return boxes


def modality_groups(names: Sequence[str], data: Mapping | None = None) -> list[list[str]]:
    """Inputs that must stay paired (ids with their mask): one group per modality (``edgemm.modality``,
    from names and, with ``data``, dtypes and shapes); inputs whose modality is unknown stay together."""
    from ..modality import resolve_inputs

    specs = {n: ((data[n].dtype, list(data[n].shape)) if data is not None and n in data else (None, None))
             for n in names}
    modality = resolve_inputs(specs)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(modality[name] or "?", []).append(name)
    return list(groups.values())


def pick(rng, n: int, batch: int, groups: list[list[str]]) -> dict:
    """Sample indices per input: the first half of the batch keeps real pairs, the second half draws
    each modality group independently."""
    import torch

    aligned = rng.choice(n, size=batch, replace=False)
    half = batch // 2 if len(groups) > 1 else batch
    picks = {}
    for group in groups:
        idx = aligned.copy()
        idx[half:] = rng.choice(n, size=batch - half, replace=True)
        for name in group:
            picks[name] = torch.from_numpy(idx)
    return picks
