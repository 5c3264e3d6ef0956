"""Hidden-state distillation for recovery: match the student's block outputs to the teacher's."""

from __future__ import annotations

from ..signature import call_module

HIDDEN_WEIGHT = 1.0   # relative to the output loss


class HiddenStates:
    """Hidden-state distillation: the outputs of the same submodules in student and teacher.

    Candidates are the blocks of every ModuleList and the model's top-level children. A pair is matched
    when the shapes agree, or when the student's last axis is a residual stream that pruning narrowed:
    prune() records (``student._edgemm_streams``) which teacher channels each stream kept and which
    layers write it; the teacher's output is then compared on those channels. Each pair contributes its
    mean squared error over the teacher's variance; the loss is their mean.
    """

    def __init__(self, student, teacher, probe_args, names=None):
        import torch

        self._store: dict = {}
        self._handles = []
        streams = getattr(student, "_edgemm_streams", [])
        candidates = _candidate_paths(teacher)
        for role, model in (("t", teacher), ("s", student)):
            for path in candidates:
                try:
                    sub = model.get_submodule(path)
                except AttributeError:
                    continue
                self._handles.append(sub.register_forward_hook(self._keeper(role, path)))
        with torch.no_grad():
            for model in (teacher, student):
                call_module(model, names or [f"input_{i}" for i in range(len(probe_args))], probe_args)
        probes = dict(self._store)
        self._store.clear()
        self.pairs: dict[str, tuple] = {}   # path -> (teacher channel index or None, scale)
        for path in candidates:
            t, s = probes.get(("t", path)), probes.get(("s", path))
            if t is None or s is None or t.ndim < 2 or s.ndim != t.ndim or t.shape[:-1] != s.shape[:-1]:
                continue
            index = None
            if s.shape[-1] != t.shape[-1]:
                kept = _stream_for(path, s.shape[-1], streams)
                if kept is None:
                    continue
                index = torch.tensor(kept, dtype=torch.long)
            ref = t if index is None else t.index_select(-1, index)
            self.pairs[path] = (index, max(float(ref.float().var()), 1e-8))
        self.matched = sorted(self.pairs)
        if not self.pairs:
            self.close()

    def _keeper(self, role, path):
        import torch

        def hook(_mod, _inp, out):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                self._store[(role, path)] = out if role == "s" else out.detach()
        return hook

    def loss(self):
        total = 0.0
        for path, (index, scale) in self.pairs.items():
            t, s = self._store[("t", path)], self._store[("s", path)]
            if index is not None:
                t = t.index_select(-1, index)
            total = total + ((s - t) ** 2).mean() / scale
        self._store.clear()
        return total / len(self.pairs)

    def close(self) -> list[str]:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._store.clear()
        return self.matched


def _candidate_paths(model) -> list[str]:
    paths = []
    for path, sub in model.named_modules():
        if not path:
            continue
        parent = path.rpartition(".")[0]
        parent_mod = model.get_submodule(parent) if parent else model
        if "." not in path or type(parent_mod).__name__ in ("ModuleList", "ModuleDict"):
            if type(sub).__name__ not in ("ModuleList", "ModuleDict"):
                paths.append(path)
    return paths


def _stream_for(path: str, width: int, streams: list) -> list[int] | None:
    """The kept teacher channels of the narrowed stream that module ``path`` outputs, if unambiguous:
    the stream written by a layer inside ``path``, or normalised by ``path`` itself."""
    def inside(p):
        return p == path or p.startswith(path + ".")

    fits = [s for s in streams if len(s["kept"]) == width]
    written = [s for s in fits if any(inside(w) for w in s["writers"])]
    if len(written) == 1:
        return written[0]["kept"]
    normed = [s for s in fits if path in s["norms"]]
    if len(normed) == 1:
        return normed[0]["kept"]
    return None
