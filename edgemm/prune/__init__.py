"""Structured pruning per modality branch, 2:4 sparsity, and recovery by distillation.

    spec = parse_prune_spec("vision=0.3,text=0.2")
    can_prune(loaded)                                   # InputError for TorchScript / ONNX
    module = prunable_module(loaded)                    # nn.Module (unflattened for .pt2)
    pruned, report = prune(module, example_feeds, calib, spec)
    recover(pruned, module, calib, steps=300)           # distil on the unlabeled calibration set
    loaded = with_pruned_module(loaded, pruned, example_feeds)

    check_sparsity_target(target, "2:4")                # refuses CPU and targets without sparse cores
    sparsity = apply_2to4(pruned, calib)                # in place; record sparsity["manifest"]

Heavy imports (torch, torch-pruning) happen inside the functions.
"""

from __future__ import annotations

from .branches import branch_of, find_branches
from .formats import can_prune, prunable_module, with_pruned_module
from .recover import recover, recovery_warnings
from .sparsity import apply_2to4, check_sparsity_target, is_two_four
from .spec import parse_prune_spec
from .structured import keep_count, prune

__all__ = ["parse_prune_spec", "find_branches", "branch_of", "prune", "recover", "recovery_warnings", "apply_2to4",
           "check_sparsity_target", "is_two_four", "can_prune", "prunable_module", "with_pruned_module",
           "keep_count"]
