"""The package's shape, checked statically (as onnx-ir's lint rules do): the import graph is acyclic,
heavy libraries are imported only by the modules that need them, the runtime never reaches torch, and
no module grows past ~500 lines without saying why at its top."""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "edgemm"

# library -> the files and folders (relative to the repository, folders end in "/") that may import it,
# at module level or inside a function. Add a row or a place here when a module truly needs one.
HEAVY_IMPORTS = {
    "torch": ("edgemm/frontends/", "edgemm/prune/", "edgemm/zoo/", "edgemm/export.py", "edgemm/reference.py",
              "edgemm/model_outputs.py", "edgemm/onnx_fastpath.py"),
    "transformers": ("edgemm/frontends/pt2_pytree.py",),
    "modelopt": ("edgemm/quant/",),
    "tensorrt": ("edgemm/runtime/tensorrt_session.py", "edgemm/backends/tensorrt/"),
    "openvino": ("edgemm/backends/openvino/", "edgemm/runtime/openvino_session.py", "edgemm/quant/"),
    "nncf": ("edgemm/quant/", "edgemm/backends/openvino/"),
}
# `import edgemm`, the CLI (every command's --help) and the runtime import no heavy library on the way in:
# they stay fast and work where the library is missing. The modules they import at module level, however
# deep, import these only inside the functions that use them.
LIGHT_ENTRY_POINTS = ("edgemm", "edgemm.cli.main", "edgemm.runtime")
LAZY_ONLY = tuple(HEAVY_IMPORTS) + ("onnx", "onnxruntime", "onnxscript", "tritonclient", "pytriton")
# What the torch-free runtime (edgemm/runtime/ and every edgemm module it imports, even lazily) may never
# import: bundles run on devices with numpy and ONNX Runtime or TensorRT only.
RUNTIME_FORBIDDEN = ("torch", "transformers", "modelopt", "onnx", "nncf")
LONG_MODULE_LINES = 500
# Modules that still read a manifest by its string keys (manifest["backend"]); every other module reads the
# typed edgemm.runtime.manifest.Manifest (manifest.backend.name). The list may only shrink.
STRING_KEY_READERS = {
    "edgemm/runtime/manifest.py": "validates the document itself",
    "edgemm/bundle.py": "reads a folder's JSON before it is known to be a bundle (--force)",
    "edgemm/pipeline/__init__.py": "builds the document that the writer validates",
}
# Modules over the limit that #15's other steps are splitting now (each entry fails once it is short).
BEING_SPLIT = {
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Imports under ``if TYPE_CHECKING:`` run only in type checkers."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


@lru_cache(maxsize=None)
def _imports(module: str) -> tuple[tuple[str, bool], ...]:
    """(imported name, at module level) for every import of ``module`` that runs: absolute names, with
    ``from X import y`` read as X.y when that is a module of the package."""
    path = _modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    top = {id(n) for n in tree.body}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                sub = f"{prefix}.{alias.name}"
                found.append((sub if sub in _modules() else prefix, id(node) in top))
    return tuple(found)


def _graph() -> dict[str, set[str]]:
    return {m: {name for name, _ in _imports(m) if name in _modules() and name != m} for m in _modules()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _allowed(rel: str, places) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in places)


def _rel(module: str) -> str:
    return _modules()[module].relative_to(ROOT).as_posix()


def test_the_import_graph_is_acyclic():
    """Lazy imports inside functions count too: a cycle through them is still two modules that each
    need the other, which is how report -> prune.compare -> verify -> report grew."""
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("library", sorted(HEAVY_IMPORTS))
def test_heavy_libraries_are_imported_only_where_needed(library):
    wrong = sorted(f"{_rel(m)} imports {name}" for m in _modules() for name, _ in _imports(m)
                   if name.split(".")[0] == library and not _allowed(_rel(m), HEAVY_IMPORTS[library]))
    assert wrong == [], f"move these imports into the modules HEAVY_IMPORTS allows for {library}"


def _closure(starts, edges) -> set[str]:
    reached, todo = set(), list(starts)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += edges[module]
    return reached


def test_the_entry_points_import_no_heavy_library_on_the_way_in():
    top_level = {m: {n for n, top in _imports(m) if top and n in _modules() and n != m} for m in _modules()}
    loaded = _closure(LIGHT_ENTRY_POINTS, top_level)
    wrong = sorted(f"{_rel(m)} imports {name} at module level" for m in loaded for name, top in _imports(m)
                   if top and name.split(".")[0] in LAZY_ONLY)
    assert "edgemm.cli.main" in loaded and wrong == [], "import it inside the function that needs it"


def _backend_modules() -> list[str]:
    """The modules ``backends.registry.get`` imports by name (importlib: invisible to the AST walk)."""
    from edgemm.backends import registry

    return [f"edgemm.backends.{where.split(':')[0]}" for where in registry.BACKENDS.values()]


def test_the_runtime_never_reaches_torch():
    """Statically: what the runtime's own modules import (even inside functions), and what those imports
    and the backend modules the registry loads for it import at module level. A backend's compile-side
    methods import their tools lazily, so they are not followed."""
    runtime = [m for m in _modules() if m == "edgemm.runtime" or m.startswith("edgemm.runtime.")]
    edges = {m: {n for n, top in _imports(m) if n in _modules() and n != m
                 and (top or m in runtime)} for m in _modules()}
    reached = _closure(runtime + _backend_modules(), edges)
    wrong = sorted(f"{_rel(m)} imports {name}" + ("" if top else " (inside a function)")
                   for m in reached for name, top in _imports(m)
                   if name.split(".")[0] in RUNTIME_FORBIDDEN and (top or m in runtime))
    assert "edgemm.iospec" in reached and wrong == []


def test_importing_the_runtime_and_its_backends_loads_no_compile_tool():
    """The same, as it happens: a fresh interpreter imports the runtime, every runtime module and every
    backend the registry knows, and none of torch, transformers, modelopt, onnx is loaded."""
    import subprocess
    import sys

    modules = [m for m in _modules() if m.startswith("edgemm.runtime")] + _backend_modules()
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(n for n in {list(RUNTIME_FORBIDDEN)!r} if n in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_manifests_are_read_through_the_typed_manifest():
    import re

    key_read = re.compile(r"manifest\[\s*[\"']|manifest\.get\(\s*[\"']")
    readers = {_rel(m) for m, path in _modules().items() if key_read.search(path.read_text(encoding="utf-8"))}
    assert sorted(readers - set(STRING_KEY_READERS)) == [], "read the typed Manifest's attributes instead"
    assert sorted(set(STRING_KEY_READERS) - readers) == [], "these read it typed now: drop them from the list"


def test_no_module_is_long_without_a_reason_at_its_top():
    """A module over ~500 lines says why in its first lines ("Long module: <why>"), or is split."""
    long = {}
    for module, path in _modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > LONG_MODULE_LINES and not any("Long module:" in line for line in lines[:40]):
            long[_rel(module)] = len(lines)
    assert sorted(set(long) - set(BEING_SPLIT)) == []
    stale = sorted(set(BEING_SPLIT) - set(long))
    assert stale == [], "these are short now (or say why they are long): drop them from BEING_SPLIT"


def test_nothing_in_the_repository_imports_the_compiler_shim():
    """edgemm/compiler.py only re-exports edgemm.pipeline for callers outside; ours use the pipeline."""
    users = sorted(str(p.relative_to(ROOT)) for folder in ("edgemm", "tests", "benchmarks")
                   for p in (ROOT / folder).rglob("*.py")
                   if p.name != "compiler.py" and p.name != "test_architecture.py"
                   and re.search(r"edgemm\.compiler\b|from \.+compiler import", p.read_text(encoding="utf-8")))
    assert users == [], f"import edgemm.pipeline instead: {users}"
