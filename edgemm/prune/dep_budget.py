"""A bound on torch-pruning's channel-dependency walk, so that pruning never hangs.

Why: torch-pruning resolves a group by walking the dependency graph and mapping channel indexes through
every op on the way. On some graphs (a flatten/reshape on a path that leads back to itself, seen on the
.pt2 of a keyword-only model with an LSTM text tower and nn.MultiheadAttention fusion) each lap multiplies
the index list, its "already visited" check never matches, and the walk runs until memory is gone. The
library has no limit of its own, so each dependency's trigger check - called once per step of the walk -
counts steps and time against a per-group budget; a group over budget is left whole (and reported),
the other groups are still pruned.
"""

from __future__ import annotations

import contextlib
import time

MAX_STEPS = 200_000   # a BERT-base MLP group takes a few thousand
MAX_SECONDS = 10.0


class DependencyLoop(Exception):
    """The walk for one group went over its budget."""


class Budget:
    def __init__(self, max_steps: int = MAX_STEPS, max_seconds: float = MAX_SECONDS):
        self.max_steps, self.max_seconds = max_steps, max_seconds
        self._steps, self._deadline = 0, None

    def watch(self, graph) -> "Budget":
        """Count every dependency step of ``graph`` (a built ``tp.DependencyGraph``) against this budget."""
        for node in graph.module2node.values():
            for dep in node.dependencies:
                dep.is_triggered_by = self._counted(dep.is_triggered_by)
        return self

    @contextlib.contextmanager
    def group(self):
        """One group's walk: its own steps and time; outside a group nothing is counted."""
        self._steps, self._deadline = 0, time.monotonic() + self.max_seconds
        try:
            yield
        finally:
            self._deadline = None

    def _counted(self, check):
        def is_triggered_by(pruning_fn):
            if self._deadline is not None:
                self._steps += 1
                if self._steps > self.max_steps or (self._steps % 256 == 0 and time.monotonic() > self._deadline):
                    raise DependencyLoop(f"more than {self.max_steps} steps or {self.max_seconds:.0f} s")
            return check(pruning_fn)
        return is_triggered_by


def all_groups(graph, root_types: tuple, budget: Budget, on_fail):
    """``graph.get_all_groups(root_module_types=root_types)`` with each group's walk under ``budget``;
    ``on_fail(module, reason)`` is called for a root whose walk went over it or raised inside
    torch-pruning (an index mapping it could not derive: seen on a .pt2 GRU's gate split); that group is
    not yielded, the others are. The loop mirrors torch-pruning's own (one group per root not already in
    an earlier group)."""
    visited: set[int] = set()
    ignored = {id(m) for m in graph.IGNORED_LAYERS_IN_TRACING}
    for module in list(graph.module2node):
        if id(module) in ignored or not isinstance(module, root_types) or id(module) in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            with budget.group():
                group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                list(range(pruner.get_out_channels(module))))
        except Exception as exc:  # noqa: BLE001 - a failed walk leaves its group whole, whatever raised
            on_fail(module, walk_failure(exc))
            continue
        prunable = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                prunable = prunable and id(dep.target.module) not in ignored
        if prunable:
            yield group


def walk_failure(exc: Exception) -> str:
    """Why a group's walk failed, as a skip reason."""
    if isinstance(exc, DependencyLoop):
        return "channel dependencies did not resolve (torch-pruning's walk looped; group left whole)"
    return f"torch-pruning could not map this group's channels ({type(exc).__name__}; group left whole)"
