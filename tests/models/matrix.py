"""The compat matrix: every model of ``tests.models.MODELS`` x every format it was saved in x every mode,
run through the CLI in subprocesses, as a user would.

    python -m tests.models.matrix --out docs/compat-matrix.md            # everything, updates README.md
    python -m tests.models.matrix --models clip,conv_gru --modes fp32,int8  # re-run some cells only

Results are kept in ``docs/compat-matrix.json`` (a partial run updates only its cells), and rendered into
``docs/compat-matrix.md`` (every cell with its command and first error line) and the README's table
between ``<!-- compat-matrix:begin -->`` and ``<!-- compat-matrix:end -->``. Nothing in them is written by
hand.

A cell passes when the compile exits 0 and its check holds:
- fp32, int8: ``edgemm verify`` of the CPU bundle against the torch model on held-out eval data exits 0;
- int8-orin: INT8 for ``jetson-orin-nx`` gives a portable TensorRT bundle whose ONNX carries INT8 Q/DQ;
- fp8-h100: FP8 for ``h100`` gives a bundle whose ONNX carries FP8 (E4M3) Q/DQ;
- branch: ``--precision <tower>=int8,<other>=fp32,fusion=fp32`` without ``--branch`` hints (early fusion:
  ``<tower>=int8,default=fp32``), then verify;
- prune: ``--prune 0.3`` compiles and the bundle's outputs (names, dtypes, shapes) equal the unpruned
  FP32 bundle's.
A cell is n/a when torch cannot save the model in that format, or when torch's own ONNX exporters fail
on the saved file too (then edgemm must fail with one line that names the problem and a fix; if it does
not, the cell fails).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODES = ("fp32", "int8", "int8-orin", "fp8-h100", "branch", "prune")
JSON_PATH = ROOT / "docs" / "compat-matrix.json"
BEGIN, END = "<!-- compat-matrix:begin -->", "<!-- compat-matrix:end -->"
CELL_TIMEOUT_S = 900
ORIN, H100 = "jetson-orin-nx", "h100"


@dataclass
class Cell:
    model: str
    format: str
    mode: str
    status: str  # pass | fail | n/a
    detail: str = ""  # first error line, or the n/a reason, or a short pass note
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    commit: str = ""  # the edgemm commit the cell ran on (a partial re-run leaves other cells as they were)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.format}/{self.mode}"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def edgemm(args: list[str], timeout: int = CELL_TIMEOUT_S) -> tuple[int, str, str]:
    """Run the CLI in a subprocess (this checkout's edgemm); (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-c", "from edgemm.cli.main import entry; entry()", *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout} s"
    return proc.returncode, proc.stdout, proc.stderr


def shown(args: list[str]) -> str:
    return "edgemm " + " ".join(shlex.quote(str(a)) for a in args)


def first_error_line(stdout: str, stderr: str) -> str:
    """The CLI's one-line error (``error: ...`` / ``internal error: ...``), else the last line printed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", stderr + "\n" + stdout)  # torch colours some messages
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in lines:
        if line.startswith(("error:", "internal error:")):
            return line[:400]
    for line in reversed(lines):
        if not line.startswith(("W", "warnings.warn")):
            return line[:400]
    return "(no output)"


def is_one_line_error(stdout: str, stderr: str) -> bool:
    """edgemm's contract for bad input: one ``error: ... (fix: ...)`` line, no traceback."""
    errors = [l for l in stderr.splitlines() if l.startswith("error:")]
    return len(errors) == 1 and "(fix:" in errors[0] and "Traceback" not in stderr


# --- checks on a compiled bundle ------------------------------------------------------------------------

def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _onnx_qdq(bundle: Path) -> tuple[int, set[int]]:
    """(number of QuantizeLinear nodes, element types of their zero points/outputs) in the bundle's ONNX."""
    import onnx

    files = sorted(bundle.glob("*.onnx"))
    if not files:
        return 0, set()
    model = onnx.load(str(files[0]), load_external_data=False)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    consts = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t.data_type
    count, types = 0, set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            count += 1
            if len(node.input) > 2:
                zp = node.input[2]
                types.add(inits.get(zp, consts.get(zp, -1)))
            for a in node.attribute:
                if a.name == "output_dtype":
                    types.add(a.i)
    return count, types


def _outputs(bundle: Path) -> list:
    return [(o.get("name"), o.get("dtype"), o.get("shape")) for o in _manifest(bundle).get("outputs", [])]


# --- one cell ------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, work: Path, say=print, known: dict[str, Cell] | None = None):
        self.work = work
        self.say = say
        # FP32 passes from an earlier run in the same work folder: they gate the other modes without
        # compiling FP32 again (a stored failure is re-run, it may have been fixed since).
        self.known_fp32 = {k: c for k, c in (known or {}).items() if k.endswith("/fp32") and c.status == "pass"
                           and (work / c.model / "bundles" / f"{c.format}-fp32" / "manifest.json").exists()}
        self.saved: dict[str, dict] = {}
        self.data: dict[str, dict] = {}
        self.results: dict[str, Cell] = {}

    def prepare(self, name: str) -> dict:
        from . import MODELS
        from .save import save_case, write_data

        if name not in self.saved:
            folder = self.work / name
            self.data[name] = write_data(MODELS[name], folder)
            self.saved[name] = save_case(MODELS[name], folder)
        return self.saved[name]

    def run(self, name: str, fmt: str, mode: str) -> Cell:
        saved = self.prepare(name)[fmt]
        key = f"{name}/{fmt}/{mode}"
        if key in self.results:
            return self.results[key]
        start = time.time()
        if saved.model is None:
            cell = Cell(name, fmt, mode, "n/a", saved.reason)
        elif mode != "fp32" and (base := self.known_fp32.get(f"{name}/{fmt}/fp32") or
                                 self.run(name, fmt, "fp32")).status != "pass":
            # Every mode starts with the same load + export: a failing FP32 compile blocks them all.
            status = "n/a" if base.status == "n/a" else "fail"
            cell = Cell(name, fmt, mode, status, f"as fp32: {base.detail}")
        else:
            cell = self._run_mode(name, saved, mode)
        cell.seconds = round(time.time() - start, 1)
        cell.commit = _commit()
        if saved.notes and cell.status == "pass":
            cell.detail = "; ".join(filter(None, [cell.detail, *saved.notes]))
        self.results[key] = cell
        self.say(f"{key}: {cell.status} {cell.detail[:200]} ({cell.seconds:.0f} s)")
        return cell

    def _bundle(self, name: str, fmt: str, mode: str) -> Path:
        return self.work / name / "bundles" / f"{fmt}-{mode}"

    def _run_mode(self, name: str, saved, mode: str) -> Cell:
        from . import MODELS

        case, data = MODELS[name], self.data[name]
        bundle = self._bundle(name, saved.format, mode)
        args = ["compile", *saved.compile_args, "--calib", data["calib"], "-o", bundle, "--force"]
        args += {"fp32": ["--fp32"], "int8": ["--int8"], "int8-orin": ["--int8", "--target", ORIN],
                 "fp8-h100": ["--fp8", "--target", H100], "prune": ["--prune", "0.3"],
                 "branch": ["--precision", _branch_policy(case)]}[mode]
        cell = Cell(name, saved.format, mode, "fail", commands=[shown(args)])
        code, out, err = edgemm(args)
        if code != 0:
            cell.detail = first_error_line(out, err)
            if mode == "fp32":
                self._judge_torch_limit(cell, saved, out, err)
            elif mode == "prune" and saved.format in ("torchscript", "script") and is_one_line_error(out, err):
                # Documented: pruning needs the module structure (torch-pruning), which TorchScript hides.
                cell.status, cell.detail = "n/a", f"edgemm prunes .pt2 and factories only; says: {cell.detail}"
            return cell
        if mode in ("fp32", "int8", "branch"):
            verify = ["verify", bundle, *saved.reference_args, "--data", data["eval"], "--iterations", "0",
                      "--no-write"]
            cell.commands.append(shown(verify))
            code, out, err = edgemm(verify)
            if code != 0:
                cell.detail = "verify: " + first_error_line(out, err)
                return cell
            if mode == "branch":
                precision = _manifest(bundle).get("precision", {})
                if "mixed" not in json.dumps(precision):
                    cell.detail = f"manifest precision is not mixed: {json.dumps(precision)[:200]}"
                    return cell
        elif mode in ("int8-orin", "fp8-h100"):
            manifest = _manifest(bundle)
            if manifest.get("backend", {}).get("name", manifest.get("backend")) not in ("tensorrt",) and \
                    "tensorrt" not in json.dumps(manifest.get("backend")):
                cell.detail = f"backend is {manifest.get('backend')!r}, not tensorrt"
                return cell
            count, types = _onnx_qdq(bundle)
            want = 3 if mode == "int8-orin" else 17  # onnx.TensorProto.INT8 / FLOAT8E4M3FN
            if count == 0 or want not in types:
                cell.detail = f"no {'INT8' if want == 3 else 'FP8 E4M3'} Q/DQ in the bundle's ONNX " \
                              f"({count} QuantizeLinear, types {sorted(types)})"
                return cell
            cell.detail = f"{count} Q/DQ"
        elif mode == "prune":
            base = self._bundle(name, saved.format, "fp32")
            if not (base / "manifest.json").exists():
                cell.detail = "no unpruned fp32 bundle to compare outputs with"
                return cell
            if _outputs(bundle) != _outputs(base):
                cell.detail = f"outputs changed: {_outputs(bundle)} != unpruned {_outputs(base)}"[:400]
                return cell
        cell.status = "pass"
        return cell

    def _judge_torch_limit(self, cell: Cell, saved, out: str, err: str) -> None:
        """edgemm failed: n/a if torch's own exporters fail on the file too and edgemm said so in one line."""
        cmd = [sys.executable, "-m", "tests.models.probe", cell.model, saved.format, saved.model]
        if saved.weights:
            cmd.append(saved.weights)
        try:
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=CELL_TIMEOUT_S, cwd=ROOT)
            found = [l for l in proc.stdout.splitlines() if l.startswith("PROBE:")]
            verdict = found[-1][len("PROBE:"):].strip() if found else f"probe crashed: {first_error_line('', proc.stderr)}"
        except subprocess.TimeoutExpired:
            verdict = "probe timed out"
        if not verdict.startswith("torch:"):
            return  # torch exports it: edgemm's failure is edgemm's
        if is_one_line_error(out, err):
            cell.status = "n/a"
            cell.detail = f"torch cannot export it ({verdict[6:].strip()[:200]}); edgemm says: {cell.detail}"
        else:
            cell.detail = f"torch cannot export it either, but edgemm's error is not one line with a fix: {cell.detail}"


def _branch_policy(case) -> str:
    """The first tower in INT8, the rest FP32. Early fusion has no tower past its embeddings for the
    second modality (tokens enter the shared encoder at once), so only the first is named there."""
    first, *rest = case.modalities
    if case.fusion == "early":
        return f"{first}=int8,default=fp32"
    return ",".join([f"{first}=int8", *(f"{m}=fp32" for m in rest), "fusion=fp32"])


# --- rendering -----------------------------------------------------------------------------------------

def load_results(path: Path = JSON_PATH) -> dict[str, Cell]:
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {k: Cell(**v) for k, v in raw.get("cells", {}).items()}


def save_results(cells: dict[str, Cell], path: Path = JSON_PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"generated_by": "python -m tests.models.matrix", "commit": _commit(),
               "updated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "cells": {k: asdict(cells[k]) for k in sorted(cells)}}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def counts(cells: dict[str, Cell]) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "n/a": 0}
    for cell in cells.values():
        out[cell.status] = out.get(cell.status, 0) + 1
    return out


_MARK = {"pass": "pass", "fail": "**FAIL**", "n/a": "n/a"}


def _rows(cells: dict[str, Cell]):
    from . import MODELS
    from .save import FORMATS

    for name in MODELS:
        for fmt in FORMATS:
            row = [cells.get(f"{name}/{fmt}/{mode}") for mode in MODES]
            if any(row):
                yield name, fmt, row


def readme_table(cells: dict[str, Cell]) -> str:
    c = counts(cells)
    lines = [f"Generated by `python -m tests.models.matrix` (commit {_commit()}, "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}): **{c['pass']} pass, {c['fail']} fail, {c['n/a']} n/a**. "
             "Formats torch itself cannot save a model in are left out; – = not run in this generation. Every "
             "cell, command and error is in [docs/compat-matrix.md](docs/compat-matrix.md).", "",
             "| model | format | " + " | ".join(MODES) + " |", "|---|---|" + "---|" * len(MODES)]
    for name, fmt, row in _rows(cells):
        if all(cell.detail.startswith("torch cannot save") for cell in row if cell is not None):
            continue
        lines.append(f"| {name} | {fmt} | " + " | ".join(_MARK[c.status] if c else "–" for c in row) + " |")
    return "\n".join(lines)


def detail_doc(cells: dict[str, Cell]) -> str:
    from . import MODELS
    from .save import FORMATS

    c = counts(cells)
    out = ["# Compat matrix (generated)", "",
           "Generated by `python -m tests.models.matrix --out docs/compat-matrix.md` from the models in "
           "`tests/models/` (tiny, random init, built at test time). Do not edit by hand. See "
           "[models.md](models.md) for the patterns and known limits.", "",
           f"Commit {_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
           f"**{c['pass']} pass, {c['fail']} fail, {c['n/a']} n/a** of {len(cells)} cells.", "",
           "Modes: " + "; ".join([
               "`fp32`/`int8`: CPU compile then `edgemm verify` against torch on held-out data",
               f"`int8-orin`: INT8 for `{ORIN}` (portable TensorRT bundle, INT8 Q/DQ in its ONNX)",
               f"`fp8-h100`: FP8 for `{H100}` (FP8 E4M3 Q/DQ)",
               "`branch`: `--precision <tower>=int8,...,fusion=fp32` without `--branch`, then verify",
               "`prune`: `--prune 0.3`, outputs equal to the unpruned bundle's"]) + ".", "",
           "## Models", "", "| model | fusion | towers | description |", "|---|---|---|---|"]
    for case in MODELS.values():
        out.append(f"| {case.name} | {case.fusion} | {', '.join(case.modalities)} | {case.description} |")
    out += ["", "## Summary", "", "| model | format | " + " | ".join(MODES) + " |", "|---|---|" + "---|" * len(MODES)]
    for name, fmt, row in _rows(cells):
        out.append(f"| {name} | {fmt} | " + " | ".join(_MARK[c.status] if c else "–" for c in row) + " |")
    commits = sorted({cell.commit for cell in cells.values() if cell.commit})
    out += ["", "Cells ran on commits " + ", ".join(commits) + " (per cell in compat-matrix.json)."] if commits else []
    out += ["", "## Failing cells", ""]
    failing = [cell for k, cell in sorted(cells.items()) if cell.status == "fail"]
    for cell in failing:
        out.append(f"- **{cell.key}**: {cell.detail}")
        for cmd in cell.commands:
            out.append(f"  - `{cmd}`")
    if not failing:
        out.append("None.")
    out += ["", "## Not applicable", ""]
    for cell in (cell for k, cell in sorted(cells.items()) if cell.status == "n/a"):
        if cell.mode == "fp32" or not cell.detail.startswith("as fp32"):
            out.append(f"- {cell.model}/{cell.format}" + ("" if cell.mode == "fp32" else f"/{cell.mode}") +
                       f": {cell.detail}")
    out += ["", "## Passing cells", ""]
    for cell in (cell for k, cell in sorted(cells.items()) if cell.status == "pass"):
        out.append(f"- {cell.key} ({cell.seconds:.0f} s)" + (f": {cell.detail}" if cell.detail else ""))
    return "\n".join(out) + "\n"


def write_readme(cells: dict[str, Cell], readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    table = readme_table(cells)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{BEGIN}\n{table}\n{END}{tail}"
    else:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers to write the table between")
    readme.write_text(text)


def main(argv=None) -> int:
    from . import MODELS
    from .save import FORMATS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "compat-matrix.md"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--work", default=None, help="folder for saved models and bundles (default: a temp dir)")
    parser.add_argument("--render-only", action="store_true", help="re-render the docs from the JSON results")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)

    cells = load_results()
    if not args.render_only:
        import tempfile

        work = Path(args.work or tempfile.mkdtemp(prefix="edgemm-matrix-"))
        runner = Runner(work, known=cells if args.work else None)
        modes = args.modes.split(",")
        for name in args.models.split(","):
            for fmt in args.formats.split(","):
                for mode in MODES:
                    if mode in modes:
                        cell = runner.run(name, fmt, mode)
                        cells[cell.key] = cell
                        save_results(cells)  # after every cell: a long run interrupted keeps what it did
    Path(args.out).write_text(detail_doc(cells))
    if not args.no_readme:
        write_readme(cells)
    c = counts(cells)
    print(f"{c['pass']} pass, {c['fail']} fail, {c['n/a']} n/a -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
