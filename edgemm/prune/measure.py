"""Size and cost of a model, per modality branch: parameters, FLOPs, torch CPU time."""

from __future__ import annotations

import contextlib
import time
from typing import Mapping, Sequence

import numpy as np

from ..signature import call_module

from .branches import branch_of

OTHER = "other"   # parameters and ops outside every branch (e.g. a logit scale, the final similarity)


@contextlib.contextmanager
def _frozen(module):
    """Parameters with requires_grad off for the block. FlopCounterMode's module tracker hooks the
    autograd graph of every submodule input that requires grad; under no_grad a parameter fed straight
    to a submodule (a .pt2's unflattened Perceiver latents into its MultiheadAttention) has no grad
    function there, and torch asserts "Expected gradient function to be set"."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def branch_costs(module, input_names: Sequence[str], feeds: Mapping[str, np.ndarray],
                 branches: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """Branch -> {"params": int, "flops": int} (FLOPs of matmul/conv ops for ``feeds``' batch, per sample),
    plus "total"."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    out: dict[str, dict] = {b: {"params": 0, "flops": 0} for b in branches}
    out[OTHER] = {"params": 0, "flops": 0}
    for name, p in module.named_parameters():
        owner = branch_of(name.rsplit(".", 1)[0] if "." in name else "", branches) or OTHER
        out[owner]["params"] += p.numel()
    counter = FlopCounterMode(display=False)
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names)
    batch = int(args[0].shape[0]) if args and args[0].ndim else 1
    with counter, torch.no_grad(), _frozen(module):
        call_module(module, input_names, args)
    counts = counter.get_flop_counts()
    root = next((k for k in counts if k != "Global" and "." not in k), None)
    total = sum(counts.get("Global", {}).values())
    assigned = 0
    for branch, paths in branches.items():
        for path in paths:
            flops = sum(counts.get(f"{root}.{path}", {}).values()) if root else 0
            out[branch]["flops"] += flops // batch
            assigned += flops
    out[OTHER]["flops"] = max(total - assigned, 0) // batch
    out["total"] = {"params": sum(v["params"] for v in out.values()),
                    "flops": total // batch}
    if out[OTHER]["params"] == 0 and out[OTHER]["flops"] == 0:
        del out[OTHER]
    return out


def branch_times(models: Mapping[str, object], input_names: Sequence[str], feeds: Mapping[str, np.ndarray],
                 branches: Mapping[str, Sequence[str]], *, warmup: int = 3, iterations: int = 20) -> dict:
    """Median torch CPU milliseconds spent in each branch's modules, for each model, measured interleaved
    (one call of each model per round, so load spikes hit all alike). ``models``: label -> module with
    the same module paths (an unpruned and a pruned copy). One torch thread: on a shared 2-core host,
    torch's spinning OpenMP threads turned one ratio into 82 ms vs 5.7 ms (0.07x) that read 0.94x alone."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names)
    samples = {label: {b: [] for b in list(branches) + ["total"]} for label in models}
    for label, model in models.items():
        model._edgemm_clock = {}  # type: ignore[attr-defined]
    handles = []
    for label, model in models.items():
        clock = model._edgemm_clock
        for branch, paths in branches.items():
            for path in paths:
                sub = model.get_submodule(path)
                handles.append(sub.register_forward_pre_hook(_start(clock, path)))
                handles.append(sub.register_forward_hook(_stop(clock, path, branch)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for i in range(warmup + iterations):
                for label, model in models.items():
                    model._edgemm_clock.clear()
                    start = time.perf_counter()
                    call_module(model, input_names, args)
                    elapsed = time.perf_counter() - start
                    if i < warmup:
                        continue
                    for branch in branches:
                        samples[label][branch].append(model._edgemm_clock.get(("branch", branch), 0.0))
                    samples[label]["total"].append(elapsed)
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
        for model in models.values():
            del model._edgemm_clock
    return {label: {b: float(np.median(v) * 1e3) for b, v in per.items()} for label, per in samples.items()}


def _start(clock, path):
    def hook(_mod, _inp):
        clock[("start", path)] = time.perf_counter()
    return hook


def _stop(clock, path, branch):
    def hook(_mod, _inp, _out):
        key = ("branch", branch)
        clock[key] = clock.get(key, 0.0) + time.perf_counter() - clock.pop(("start", path))
    return hook
