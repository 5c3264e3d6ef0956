"""torch-pruning's dependency walk runs under a budget: a group whose walk goes over it is left whole
and reported, never a hang (a .pt2 with an LSTM text tower and nn.MultiheadAttention fusion looped for
more than 9 minutes, growing by GBs)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
tp = pytest.importorskip("torch_pruning")

from edgemm.prune.dep_budget import Budget, DependencyLoop, all_groups  # noqa: E402


def _graph():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2)).eval()
    return model, tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 4))


def _roots(groups):
    return [id(g[0].dep.target.module) for g in groups]


def test_groups_within_budget_are_torch_prunings_own():
    model, graph = _graph()
    roots = (torch.nn.Linear,)
    looped = []
    ours = list(all_groups(graph, roots, Budget().watch(graph), lambda m, why: looped.append(m)))
    assert sorted(_roots(ours)) == sorted(_roots(graph.get_all_groups(root_module_types=roots))) and len(ours) == 3
    assert looped == []


def test_a_walk_over_budget_is_stopped_and_its_group_left_out():
    model, graph = _graph()
    budget = Budget(max_steps=1).watch(graph)
    looped = []
    assert list(all_groups(graph, (torch.nn.Linear,), budget, lambda m, why: looped.append((m, why)))) == []
    assert sorted(id(m) for m, _ in looped) == sorted(id(model[i]) for i in (0, 2, 4))
    assert all("walk looped" in why for _, why in looped)
    with pytest.raises(DependencyLoop), budget.group():
        graph.get_pruning_group(model[0], tp.prune_linear_out_channels, [0])
    graph.get_pruning_group(model[0], tp.prune_linear_out_channels, [0])  # outside a group: not counted


def test_a_walk_torch_pruning_cannot_map_leaves_that_group_whole_and_yields_the_others():
    """A .pt2 GRU's gate split gave torch-pruning an empty split offset: IndexError inside its walk."""
    model, graph = _graph()
    real = graph.get_pruning_group

    def get_pruning_group(module, fn, idxs):
        if module is model[2]:
            raise IndexError("list index out of range")
        return real(module, fn, idxs)

    graph.get_pruning_group = get_pruning_group
    failed = []
    groups = list(all_groups(graph, (torch.nn.Linear,), Budget().watch(graph), lambda m, why: failed.append((m, why))))
    assert len(groups) == 2 and [m for m, _ in failed] == [model[2]]
    assert "IndexError" in failed[0][1] and "group left whole" in failed[0][1]
