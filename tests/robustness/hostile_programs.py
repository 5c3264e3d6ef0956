"""Hostile model *programs*: TorchScript and .pt2 models whose operators reach the compiling machine's
files, config files that switch trust on, and factories that are not model factories. Built at test time,
each in its own folder holding a planted ``victim.bin`` (which a payload would overwrite or read) and, for
payloads that create files, a sentinel path. What the CLI must do is in test_model_programs.py.

Every TorchScript payload keeps its paths as module attributes (TorchScript has no closures), so the
same file written by ``torch.jit.save`` carries them.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Tuple

import torch
from torch import nn

VICTIM_BYTES = b"user data: must stay byte-identical\n"


@dataclass
class Hostile:
    name: str
    argv: list[str]                   # arguments after `edgemm`
    where: str                        # the error line must start with "error: " + where
    workdir: Path
    victim: Path
    output: Path | None = None        # must not exist afterwards
    sentinel: Path | None = None      # the payload would create it
    mentions: tuple[str, ...] = ()    # the line must also say these (the refused operator, the fix)
    model: Path | None = None         # for the --trust-pickle counter-check


# ----------------------------------------------------------------------------------- TorchScript

def _write(victim: str) -> torch.Tensor:
    t = torch.from_file(victim, shared=True, size=8, dtype=torch.uint8)
    t.fill_(88)
    return t.float().sum()


class WriteInForward(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        t = torch.from_file(self.victim, shared=True, size=8, dtype=torch.uint8)
        t.fill_(88)
        return self.lin(x) + t.float().sum() * 0  # used, or TorchScript drops the write as dead code


class ReadSecretIntoOutput(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        secret = torch.from_file(self.victim, shared=False, size=8, dtype=torch.uint8)
        return x + secret.float()[:4]


class Writer(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        return x + _write(self.victim)


class WriteInSubmodule(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Writer(victim))

    def forward(self, x):
        return self.inner(x)


class WriteInHelperMethod(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def helper(self, x):
        t = torch.from_file(self.victim, shared=True, size=8, dtype=torch.uint8)
        t.fill_(88)
        return x + t.float().sum() * 0

    def forward(self, x):
        return self.helper(x) * 2


class WriteInUntakenBranch(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        if bool(x.sum() > 1e30):  # never true on real data: a runtime check would miss it
            x = x + _write(self.victim)
        return x


class WriteInLoop(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        for _ in range(2):
            x = x + _write(self.victim) * 0
        return x


class WriteInForkedTask(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        future = torch.jit.fork(_write, self.victim)
        return x + torch.jit.wait(future) * 0


class SaveCreatesFile(nn.Module):
    def __init__(self, sentinel: str):
        super().__init__()
        self.sentinel = sentinel

    def forward(self, x):
        torch.save(x, self.sentinel)
        return x


class WriteOnLoad(nn.Module):
    """torch.jit.load calls __setstate__: the payload runs before anything is called."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim
        self.seen = torch.zeros(8)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self):
        return (self.victim, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]):
        self.victim = state[0]
        self.training = state[1]
        t = torch.from_file(self.victim, shared=True, size=8, dtype=torch.uint8)
        t.fill_(88)
        self.seen = t.float()


class WriteInExportedMethod(nn.Module):
    """forward is pure; an exported method nobody calls here still ships in the program."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        return x * 2

    @torch.jit.export
    def maintenance(self, x):
        return x + _write(self.victim)


@torch.jit.script
class WritingContext:
    def __init__(self, victim: str):
        self.victim = victim
        self.total = torch.zeros(1)

    def __enter__(self):
        self.total = _write(self.victim) + self.total

    def __exit__(self, kind: Any, value: Any, tb: Any):
        pass


class WriteInContextManager(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        context = WritingContext(self.victim)
        with context:
            y = x * 2
        return y + context.total * 0


@torch.jit.script
class Scribe:
    def __init__(self, victim: str):
        self.victim = victim

    def scribble(self, x: torch.Tensor) -> torch.Tensor:
        return x + _write(self.victim) * 0


class WriteInScriptClass(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        return Scribe(self.victim).scribble(x)


class PrintsToStdout(nn.Module):
    def forward(self, x):
        print("\x1b[2Kerror: forged line")
        return x


def _script_case(name: str, make: Callable[[str, str], nn.Module], *, mentions=("--trust-pickle",),
                 field: str | None = None):
    def build(work: Path, good) -> Hostile:
        victim, sentinel = _plant(work)
        model = work / "model.pt"
        torch.jit.save(torch.jit.script(make(str(victim), str(sentinel)).eval()), str(model))
        out = work / "out"
        return Hostile(name, ["compile", str(model), "-o", str(out), "--input", "x:1x4:float32"],
                       f"{model}: " + (field or ""), work, victim, output=out, sentinel=sentinel,
                       mentions=mentions, model=model)
    return name, build


def _quantized_custom_class(work: Path, good) -> Hostile:
    victim, sentinel = _plant(work)
    model = work / "model.pt"
    qlinear = torch.ao.nn.quantized.dynamic.Linear(4, 4)   # holds a torch.classes.quantized packed-params object
    torch.jit.save(torch.jit.script(qlinear), str(model))
    out = work / "out"
    return Hostile("ts-custom-cpp-class", ["compile", str(model), "-o", str(out), "--input", "x:1x4:float32"],
                   f"{model}: ", work, victim, output=out, mentions=("custom C++ class", "--trust-pickle"), model=model)


# ------------------------------------------------------------------------------------------ .pt2

class _Constructs(nn.Module):
    """An exported program whose first node builds a tensor and whose second fills it in place: the
    first node is retargeted to another operator in the archive's JSON, as a hostile exporter would."""

    def forward(self, x):
        t = torch.empty(8, dtype=torch.uint8)
        t = t.fill_(88)
        return x + t.float().sum()


class _Branches(nn.Module):
    """torch.cond: the hostile node hides in a branch's subgraph."""

    def forward(self, x):
        return torch.cond(x.sum() > 1e30, lambda t: t.sin(), lambda t: t.cos(), (x,))


def _first_node(graph: dict) -> dict:
    return graph["nodes"][0]


def _first_branch_node(graph: dict) -> dict:
    cond = next(n for n in graph["nodes"] if n["target"] == "torch.ops.higher_order.cond")
    branch = next(i["arg"]["as_graph"] for i in cond["inputs"] if "as_graph" in i["arg"])
    return branch["graph"]["nodes"][0]


def _pt2_retarget(name: str, edit: Callable[[dict, Path, Path], None], *, mentions=("--trust-pickle",),
                  field: str = "node ", program: type = _Constructs, pick: Callable[[dict], dict] = _first_node):
    def build(work: Path, good) -> Hostile:
        victim, sentinel = _plant(work)
        plain = work / "plain.pt2"
        torch.export.save(torch.export.export(program(), (torch.zeros(2, 4),)), str(plain))
        model = work / "model.pt2"
        with zipfile.ZipFile(plain) as zf:
            members = {i.filename: zf.read(i.filename) for i in zf.infolist()}
        plain.unlink()
        doc_name = next(n for n in members if n.endswith("models/model.json"))
        doc = json.loads(members[doc_name])
        edit(pick(doc["graph_module"]["graph"]), victim, sentinel)
        members[doc_name] = json.dumps(doc).encode()
        with zipfile.ZipFile(model, "w", zipfile.ZIP_STORED) as zf:
            for member_name, data in members.items():
                zf.writestr(member_name, data)
        out = work / "out"
        return Hostile(name, ["compile", str(model), "-o", str(out)], f"{model}: {doc_name}: {field}", work, victim,
                       output=out, sentinel=sentinel, mentions=mentions, model=model)
    return name, build


def _from_file(shared: bool):
    def edit(node, victim, sentinel):
        node["target"] = "torch.ops.aten.from_file.default"
        node["inputs"] = [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                          {"name": "shared", "arg": {"as_bool": shared}, "kind": 1},
                          {"name": "size", "arg": {"as_int": 8}, "kind": 1},
                          {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}]
    return edit


def _target(target: str, inputs: Callable[[Path, Path], list]):
    def edit(node, victim, sentinel):
        node["target"] = target
        node["inputs"] = inputs(victim, sentinel)
    return edit


def _custom_obj_arg(node, victim, sentinel):
    node["inputs"].append({"name": "obj", "arg": {"as_custom_obj": {"name": "obj0", "class_fqn":
                                                                     "__torch__.torch.classes.x.Y"}}, "kind": 1})


# ----------------------------------------------------------------------- other commands, same programs

def _via(command: str, inner: Callable, name: str):
    """The same hostile program reached through verify --reference, bench --reference or inspect."""
    def build(work: Path, good) -> Hostile:
        case = inner(work, good)
        bundle, data = work / "bundle", work / "data.npz"
        shutil.copytree(good.bundle, bundle)
        shutil.copyfile(good.calib, data)
        argv = {"verify": ["verify", str(bundle), "--reference", str(case.model), "--data", str(data)],
                "bench": ["bench", str(bundle), "--reference", str(case.model), "--iterations", "2"],
                "inspect": ["inspect", str(case.model)]}[command]
        return Hostile(name, argv, case.where, work, case.victim, sentinel=case.sentinel, mentions=case.mentions,
                       model=case.model)
    return name, build


# --------------------------------------------------------------------------- trust from a file

def _config_trust(name: str, inner: Callable):
    def build(work: Path, good) -> Hostile:
        case = inner(work, good)
        cfg = work / "config.json"
        cfg.write_text(json.dumps({"model": str(case.model), "output": str(work / "out"), "trust_pickle": True,
                                   "inputs": ["x:1x4:float32"]}))
        return Hostile(name, ["compile", "--config", str(cfg)], f"{cfg}: trust_pickle: ", work, case.victim,
                       output=work / "out", sentinel=case.sentinel, mentions=("--trust-pickle",), model=case.model)
    return name, build


def _pickled_payload(work: Path, good) -> Hostile:
    """A torch.save'd object whose unpickling creates the sentinel (runs only if trusted)."""
    from tests.robustness.make_corpus import _OpenOnUnpickle

    victim, sentinel = _plant(work)
    model = work / "model.pt"
    torch.save(_OpenOnUnpickle(sentinel), str(model))
    return Hostile("pickle", [], "", work, victim, sentinel=sentinel, model=model)


# ------------------------------------------------------------------------------------- factories

USER_MODULE = '''
import os
import torch
from os import abort
from shutil import rmtree
from sys import exit as leave


def exits():
    raise SystemExit(0)


def exits_with_code():
    leave(3)


def interrupts():
    raise KeyboardInterrupt


def returns_none():
    return None


def returns_tensor():
    return torch.zeros(2)


def returns_model_class():
    return torch.nn.Linear


def recurses():
    return recurses()


class NotAModel:
    def __init__(self):
        open(os.path.join(os.path.dirname(__file__), "PWNED"), "w").close()
'''


def _factory(name: str, spec: str, *, mentions=()):
    def build(work: Path, good) -> Hostile:
        victim, sentinel = _plant(work)
        (work / "userfactories.py").write_text(USER_MODULE)
        out = work / "out"
        return Hostile(name, ["compile", spec, "-o", str(out), "--input", "x:1x4:float32"], "MODEL: " + spec, work,
                       victim, output=out, sentinel=sentinel, mentions=mentions)
    return name, build


# ------------------------------------------------------------------------------------------ helpers

def _plant(work: Path) -> tuple[Path, Path]:
    victim = work / "victim.bin"
    victim.write_bytes(VICTIM_BYTES)
    return victim, work / "PWNED"


def _ts(cls):
    return lambda victim, sentinel: cls(victim)


CASES: list[tuple[str, Callable[[Path, Any], Hostile]]] = [
    # 1. TorchScript programs reaching files (every method, submodule, block, task and class)
    _script_case("ts-from-file-write-in-forward", _ts(WriteInForward), field="__torch__.",
                 mentions=("aten::from_file", "--trust-pickle")),
    _script_case("ts-from-file-read-into-output", _ts(ReadSecretIntoOutput), mentions=("aten::from_file",)),
    _script_case("ts-from-file-in-submodule", _ts(WriteInSubmodule)),
    _script_case("ts-from-file-in-helper-method", _ts(WriteInHelperMethod)),
    _script_case("ts-from-file-in-untaken-if-branch", _ts(WriteInUntakenBranch)),
    _script_case("ts-from-file-in-loop-body", _ts(WriteInLoop)),
    _script_case("ts-from-file-in-forked-task", _ts(WriteInForkedTask)),
    _script_case("ts-save-creates-file", lambda victim, sentinel: SaveCreatesFile(sentinel),
                 mentions=("aten::save",)),
    _script_case("ts-setstate-writes-on-load", _ts(WriteOnLoad), mentions=("__setstate__", "--trust-pickle")),
    _script_case("ts-from-file-in-uncalled-exported-method", _ts(WriteInExportedMethod)),
    _script_case("ts-from-file-in-context-manager", _ts(WriteInContextManager)),
    _script_case("ts-from-file-in-script-class-method", _ts(WriteInScriptClass)),
    _script_case("ts-print-forges-output", lambda victim, sentinel: PrintsToStdout(), mentions=("prim::Print",)),
    ("ts-custom-cpp-class", _quantized_custom_class),
    # 1. .pt2 programs reaching files, Python or native code
    _pt2_retarget("pt2-from-file-shared-write", _from_file(True), mentions=("aten.from_file", "--trust-pickle")),
    _pt2_retarget("pt2-from-file-read", _from_file(False)),
    _pt2_retarget("pt2-from-file-in-cond-branch", _from_file(True), program=_Branches, pick=_first_branch_node,
                  mentions=("aten.from_file",)),
    _pt2_retarget("pt2-aten-save", _target("torch.ops.aten.save.default", lambda v, s: [
        {"name": "item", "arg": {"as_tensor": {"name": "x"}}, "kind": 1},
        {"name": "filename", "arg": {"as_string": str(s)}, "kind": 1}])),
    _pt2_retarget("pt2-aten-print", _target("torch.ops.aten._print.default", lambda v, s: [
        {"name": "s", "arg": {"as_string": "forged"}, "kind": 1}])),
    _pt2_retarget("pt2-manual-seed", _target("torch.ops.aten.manual_seed.default", lambda v, s: [
        {"name": "seed", "arg": {"as_int": 0}, "kind": 1}])),
    _pt2_retarget("pt2-profiler-namespace-op", _target("torch.ops.profiler._record_function_enter_new.default",
                                                       lambda v, s: [{"name": "name", "arg": {"as_string": "x"},
                                                                      "kind": 1}])),
    _pt2_retarget("pt2-higher-order-flat-apply", _target("torch.ops.higher_order.flat_apply", lambda v, s: [])),
    _pt2_retarget("pt2-higher-order-call-torchbind", _target("torch.ops.higher_order.call_torchbind",
                                                             lambda v, s: [])),
    _pt2_retarget("pt2-custom-object-argument", _custom_obj_arg, mentions=("custom C++ class",),
                  field="as_custom_obj"),
]

_BY_NAME = dict(CASES)

CASES += [
    # 1. every command that loads a model applies the same guard
    _via("verify", _BY_NAME["ts-from-file-write-in-forward"], "verify-reference-ts-from-file"),
    _via("verify", _BY_NAME["pt2-from-file-shared-write"], "verify-reference-pt2-from-file"),
    _via("bench", _BY_NAME["ts-from-file-in-submodule"], "bench-reference-ts-from-file"),
    _via("bench", _BY_NAME["pt2-from-file-read"], "bench-reference-pt2-from-file"),
    _via("inspect", _BY_NAME["ts-setstate-writes-on-load"], "inspect-ts-setstate"),
    _via("inspect", _BY_NAME["pt2-aten-save"], "inspect-pt2-aten-save"),
    # 2. trust switched on by a file
    _config_trust("config-trust-pickle-on-pickle", _pickled_payload),
    _config_trust("config-trust-pickle-on-torchscript", _BY_NAME["ts-from-file-write-in-forward"]),
    _config_trust("config-trust-pickle-on-pt2", _BY_NAME["pt2-from-file-shared-write"]),
    # 3. factories that are not model factories
    _factory("factory-sys-exit", "sys:exit", mentions=("standard library",)),
    _factory("factory-os-abort", "os:abort"),
    _factory("factory-builtins-breakpoint", "builtins:breakpoint"),
    _factory("factory-os-getcwd", "os:getcwd"),
    _factory("factory-code-interact", "code:interact"),
    _factory("factory-shutil-rmtree", "shutil:rmtree"),
    _factory("factory-antigravity-import", "antigravity:geohash"),
    _factory("factory-reexported-os-abort", "userfactories:abort"),
    _factory("factory-reexported-shutil-rmtree", "userfactories:rmtree", mentions=("standard library",)),
    _factory("factory-reexported-sys-exit", "userfactories:leave"),
    _factory("factory-raises-systemexit", "userfactories:exits", mentions=("exit(0)",)),
    _factory("factory-calls-exit-3", "userfactories:exits_with_code", mentions=("exit(3)",)),
    _factory("factory-raises-keyboardinterrupt", "userfactories:interrupts", mentions=("KeyboardInterrupt",)),
    _factory("factory-returns-none", "userfactories:returns_none", mentions=("NoneType",)),
    _factory("factory-returns-tensor", "userfactories:returns_tensor", mentions=("Tensor",)),
    _factory("factory-returns-a-class", "userfactories:returns_model_class", mentions=("type",)),
    _factory("factory-recurses-forever", "userfactories:recurses", mentions=("RecursionError",)),
    _factory("factory-non-module-class", "userfactories:NotAModel", mentions=("not a torch.nn.Module subclass",)),
    _factory("factory-builtin-from-torch", "torch:get_num_threads", mentions=("not a Python function",)),
]

assert len({name for name, _ in CASES}) == len(CASES), "case names must be unique"
