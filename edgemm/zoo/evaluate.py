"""Run a zoo model (torch) on its eval split and score it with the task metric."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..task import compute
from . import registry


@torch.no_grad()
def run(model: torch.nn.Module, name: str, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``data`` (one batch), keyed by the card's output names."""
    card = registry.card(name)
    result = model(*(torch.from_numpy(np.ascontiguousarray(data[key])) for key in card.input_names))
    if isinstance(result, torch.Tensor):
        result = (result,)
    return {key: value.numpy() for key, value in zip(card.outputs, result)}


def score(name: str, model: torch.nn.Module, data: Mapping[str, np.ndarray]) -> float:
    """Task metric (percent) of ``model`` on ``data`` (which must carry ``labels``)."""
    card = registry.card(name)
    return compute(card.metric, run(model, name, data), data["labels"], card.metric_outputs)
