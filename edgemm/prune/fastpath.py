"""Pruning and recovery run with PyTorch's multi-head-attention fast path off.

In eval mode without grad, ``nn.TransformerEncoder`` / ``nn.MultiheadAttention`` take a fused "fast path"
that returns nested tensors for padded batches (``src_key_padding_mask``). Forward hooks, ``torch.equal``
and torch-pruning's dependency tracing cannot handle those ("NestedTensorImpl doesn't support sizes").
The slow path computes the same function with ordinary tensors.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def mha_fastpath_off():
    """Also a decorator (``@mha_fastpath_off()``): contextlib's context managers are."""
    import torch

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
