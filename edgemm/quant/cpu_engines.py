"""The CPU target's engine search: ONNX Runtime INT8 (cpu_int8.select_recipe's pick) against OpenVINO FP32,
BF16, NNCF INT8 and INT8 with BF16 islands, on the compiling host, at the batch sizes the bundle declares.

Why: the fastest faithful CPU deployment depends on the host's ISA (issue #20, MiniLM-fused seq 128): on an
AMX Xeon OpenVINO's BF16 ran 0.22-0.48x edgemm's FP32 ORT bundle where ORT INT8 ran 0.40-0.47x; on this
session's AMD EPYC (AVX512-BF16 + VNNI, no AMX) OpenVINO BF16 ran 0.57x and NNCF INT8 0.41x at batch 1.
Candidates are built only where the ISA gives them a reason to exist (BF16 needs AMX-BF16 or AVX512-BF16;
guarded INT8 rungs only while INT8 misses the bar), judged as verify judges a bundle (``CandidateJudge``:
parity.verify.evaluate against ORT FP32 with the gate's bars), timed interleaved with the FP32 ORT model per batch size, and ranked by the geometric mean of their p50
ratios. The bundle carries the winner, any faster candidate that serves hosts the winner's features do
not, and always the ORT INT8 model as the fallback (runtime/variants.py picks on the device).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..hostinfo import INT8_DOT
from .engine_table import format_table  # noqa: F401 (its home; the compile log prints it)

X86_BF16 = ("amx_bf16", "avx512_bf16")
# Features every shipping CPU with the key also has: a host that has the key runs what these need.
# (AMX parts are Sapphire Rapids and later: AVX512-BF16 and VNNI too; AVX512-BF16 parts, Cooper Lake and
# Zen 4/5, have AVX512-VNNI.) Used to skip variants whose hosts an earlier variant already serves.
IMPLIED = {"amx_bf16": {"amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni"},
           "amx_int8": {"amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni"},
           "avx512_bf16": {"avx512_vnni"}, "i8mm": {"asimddp"}, "bf16": {"asimddp"}}
CARRY_GAIN = 0.9   # a variant must measure >= 10% faster than the fallback to be worth its bytes (noise)
MAX_OPENVINO_VARIANTS = 3   # bundle size: each carries the weights again
GUARD_OUTLIER_RATIO = 50.0   # the guarded NNCF candidate keeps these MatMuls float, as cpu_int8's guarded rung
# Guarded rungs: while the bar is missed, twice as many outlier-ranked MatMuls kept float (BF16 under a bf16
# hint: "INT8 with BF16 islands"), at most this many NNCF builds after the plain one (each 5-50 s on MiniLM).
# Pretrained MiniLM-fused (AVX512-BF16 EPYC; text cosine vs torch FP32): plain 0.9954; 4 FFN down-projections
# (ratio > 50) + heads 0.9986; 11 MatMuls (ratio > 20) 0.9994 (alpha 0.95). The error is spread over many
# layers (any one activation quantizer bypassed moved it < 0.0003), mostly in the SmoothQuant-scaled weights.
GUARDED_RUNGS = 3
# SmoothQuant migration strength of the guarded rungs (NNCF's TRANSFORMER default, 0.95, is LLM-tuned). Same
# model: text cosine 0.9864 / 0.9969 / 0.9974 / 0.9954 at alpha 0.5 / 0.7 / 0.85 / 0.95 (off: 0.9905);
# outlier MatMuls kept float: 0.9986 at 0.85 vs 0.9982 at 0.95.
GUARDED_SQ_ALPHA = 0.85


@dataclass
class EngineRow:
    name: str
    engine: str
    precision: str
    requires_any: list[str]
    status: str = "failed"   # "selected" | "carried" | "ok" | "inaccurate" | "failed" | "reference"
    min_cosine: float | None = None
    agreement: dict = field(default_factory=dict)
    p50_ms: dict = field(default_factory=dict)      # batch -> ms
    p50_ratio: dict = field(default_factory=dict)   # batch -> p50 / ORT FP32 p50, same run
    score: float | None = None                      # geometric mean of p50_ratio
    task_metric: float | None = None                # the task metric on the held-out samples, when labelled
    build_s: float | None = None
    ignored_nodes: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EngineChoice:
    table: list[EngineRow]
    fallback: str              # the name of the table row whose ORT model the bundle carries last
    variants: list[dict]       # fastest first; OpenVINO ones carry "model" (an openvino.Model), no fallback
    batches: list[int]
    seconds: float


JUDGE_SAMPLES = 128   # labelled samples each candidate is judged on when the task metric can be scored


class CandidateJudge:
    """Judges a candidate as ``edgemm verify`` and the compile gate judge a bundle: ``parity.verify.evaluate``
    (each output's mean cosine, top-1 agreement of class-score outputs, exact match of integer outputs, the
    task metric's drop when labelled) against ORT FP32, by the same thresholds, on the same call size. Judged
    on the labelled samples when there are (up to JUDGE_SAMPLES: the task metric needs them), else on the
    held-out samples. The FP32 reference runs once and is replayed for each candidate."""

    def __init__(self, onnx_graph, names: Sequence[str], eval_feeds: Sequence[dict], reference_run: Callable,
                 thresholds, *, task=None, labelled=None):
        from ..data import Dataset
        from ..parity.output_kinds import graph_score_outputs
        from .cpu_int8 import JUDGE_BATCH
        from .ort_calib import check_calib, input_specs

        specs = input_specs(onnx_graph)
        fixed = next((dims[0] for _, dims in specs.values() if dims and dims[0]), None)
        self.batch_size = fixed or JUDGE_BATCH
        arrays, labels = _stack(eval_feeds), None
        if labelled is not None and task is not None:
            n = min(JUDGE_SAMPLES, len(labelled[1]))
            n -= n % (fixed or 1)   # whole calls of a fixed-batch model
            if n:
                arrays = check_calib({k: np.asarray(v)[:n] for k, v in labelled[0].items()}, specs, "labelled samples")
                labels = np.asarray(labelled[1])[:n]
        self.data = Dataset(Path("held-out samples"), arrays, labels, "")
        self.names, self.thresholds = list(names), thresholds
        self.task = task if labels is not None else None
        self.heads = graph_score_outputs(onnx_graph)
        self.reference_task_metric: float | None = None
        self._reference = [self._named(reference_run(b)) for b in self.data.batches(self.batch_size)]

    def _named(self, outputs) -> dict[str, np.ndarray]:
        return {n: np.asarray(o) for n, o in zip(self.names, outputs)}

    def __call__(self, row: "EngineRow", run: Callable) -> None:
        """Fill ``row``'s agreement, min cosine, task metric and status ("ok" / "inaccurate", the failures
        in its note) from ``run`` (feed -> outputs in model order)."""
        from ..errors import InputError
        from ..parity.verify import evaluate

        replay = iter(self._reference)
        try:
            report = evaluate(lambda b: self._named(run(b)), lambda b: next(replay), self.data, self.thresholds,
                              output_names=self.names, batch_size=self.batch_size, task=self.task, heads=self.heads)
        except InputError:
            if self.task is None:
                raise
            self.task = None   # a task metric that does not fit these outputs is a missing figure, not a crash
            return self(row, run)
        for name, entry in report["outputs"].items():
            cosine = entry.get("mean_cosine")
            row.agreement[name] = {"metric": "cosine" if cosine is not None else "equal",
                                   "value": round(cosine if cosine is not None else entry["exact_match"], 6)}
            if entry.get("top1_agreement") is not None:
                row.agreement[name]["top1"] = round(entry["top1_agreement"], 6)
        row.min_cosine = min(v["value"] for v in row.agreement.values())
        if "task" in report:
            row.task_metric = round(report["task"]["bundle"], 3)
            self.reference_task_metric = round(report["task"]["reference"], 3)
        row.status = "ok" if report["passed"] else "inaccurate"
        row.note = "; ".join(report["failures"])


def _requirements(engine: str, precision: str) -> list[str]:
    """The ISA features one of which a host needs to run ``precision`` ("int8", "int8+bf16") at speed."""
    from ..precision import Precision

    parts = Precision.of(precision.split("+"))
    if parts.includes("bf16"):
        return list(X86_BF16)
    if parts.includes("int8"):
        return sorted(INT8_DOT)
    return []


def _serves_new_hosts(need: Sequence[str], carried: Sequence[Sequence[str]]) -> bool:
    """Whether some host runs ``need`` at speed but none of the ``carried`` requirement lists."""
    if any(not c for c in carried):
        return False
    hosts = [{f} | IMPLIED.get(f, set()) for f in need] if need else [set()]
    return any(all(not (set(c) & host) for c in carried) for host in hosts)


def _feeds_at(arrays: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    n = next(iter(arrays.values())).shape[0]
    reps = -(-batch // n)
    return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:batch]) for k, v in arrays.items()}


def _stack(feeds: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def search_engines(fp32_onnx: Path, ort_int8: Path, ort_int8_session: Mapping, calib_feeds: Sequence[dict],
                   eval_feeds: Sequence[dict], *, batches: Sequence[int], min_cosine: float, isa: frozenset[str],
                   min_top1: float | None = None, max_metric_drop: float | None = None,
                   ignored: Sequence[str] = (), log: Callable[[str], None] = print,
                   timing_budget_s: float = 8.0, fallback: str = "int8", task=None,
                   labelled: tuple[Mapping[str, np.ndarray], np.ndarray] | None = None) -> EngineChoice:
    """Build the OpenVINO candidates this host's ISA supports, judge each against ORT FP32 as verify judges a
    bundle (``CandidateJudge``: every output's mean cosine >= ``min_cosine``, class scores' top-1 agreement
    >= ``min_top1``, the task metric's drop <= ``max_metric_drop`` when ``labelled``; the INT8 bars by
    default), time them with ORT FP32 and ORT INT8 (``ort_int8_session``: cpu_session kwargs) at each
    batch size. ``task`` (metric, outputs) and ``labelled`` (arrays, labels): the task metric."""
    from ..backends import openvino as ovb
    from ..onnx_io import cpu_session
    from ..parity.latency import measure_interleaved_within
    from ..parity.thresholds import defaults_for, with_overrides

    started = time.perf_counter()
    fp32_sess = cpu_session(fp32_onnx, spinning=False)
    names = [o.name for o in fp32_sess.get_outputs()]
    base = ovb.read_onnx(fp32_onnx)
    import onnx

    onnx_graph = onnx.load(str(fp32_onnx), load_external_data=False)
    judge = CandidateJudge(onnx_graph, names, eval_feeds, lambda feed: fp32_sess.run(None, feed),
                           with_overrides(defaults_for("int8"), min_cosine=min_cosine, min_top1_agreement=min_top1,
                                          max_metric_drop=max_metric_drop), task=task, labelled=labelled)

    rows: list[EngineRow] = []
    runners: dict[str, Callable] = {}   # name -> feed -> None (timed)
    models: dict[str, tuple[object, str]] = {}   # name -> (openvino.Model, inference precision)

    # The ONNX Runtime model the bundle always carries: ``ort_int8`` (select_recipe's pick), or with
    # ``fallback="fp32"`` the FP32 model itself (no INT8 recipe met the bar). Judged like every candidate;
    # carried whatever the verdict (it is what a host without the other variants' features runs).
    ort_row = EngineRow(f"onnxruntime-{fallback}", "onnxruntime", fallback, _requirements("onnxruntime", fallback))
    ort_sess = cpu_session(ort_int8, spinning=False, **ort_int8_session)
    judge(ort_row, lambda feed, s=ort_sess: s.run(None, feed))
    rows.append(ort_row)
    runners[ort_row.name] = lambda feed, s=ort_sess: s.run(None, feed)

    has_bf16 = bool(set(X86_BF16) & isa)
    plan = [("openvino-fp32", "fp32", "f32", None)]
    if has_bf16:
        plan.append(("openvino-bf16", "bf16", "bf16", None))
    plan.append(("openvino-int8", "int8", "f32", "plain"))
    if has_bf16:
        plan.append(("openvino-int8-bf16", "int8+bf16", "bf16", "plain"))
    int8_models: dict[object, tuple] = {}
    ranking: list = []   # the guarded rungs' outlier ranking, measured once

    def build_int8(kind):
        """``"plain"``: NNCF's defaults; ``("guarded", k)``: the k most outlier-heavy MatMuls and the output
        projections kept float (BF16 under a bf16 hint), SmoothQuant at GUARDED_SQ_ALPHA."""
        if kind in int8_models:
            return int8_models[kind]
        keep, alpha = set(ignored), None
        if kind != "plain":   # plan_guarded measured the ranking
            keep |= _guarded_nodes(*ranking[0], kind[1])
            alpha = GUARDED_SQ_ALPHA
        names = ovb.openvino_names(onnx_graph, keep)
        int8_models[kind] = (ovb.quantize_int8(base, calib_feeds, ignored=names, smooth_quant_alpha=alpha), len(keep))
        return int8_models[kind]

    def plan_guarded(rung: int) -> None:
        """The rung-th guarded INT8 (f32 and, with BF16 in the ISA, bf16 islands), unless planned or past the last."""
        if rung >= GUARDED_RUNGS or any(isinstance(p[3], tuple) and p[3][2] == rung for p in plan):
            return
        if not ranking:
            try:
                ranking.append(_outlier_ranking(fp32_onnx, calib_feeds))
            except Exception as exc:  # a graph the probe cannot augment loses the guarded rungs, not the compile
                log(f"  guarded INT8 not built: outlier probe failed ({type(exc).__name__}: {str(exc)[:200]})")
                ranking.append(([], set()))
                return
        ranked, heads = ranking[0]
        k = _guarded_count(ranked, rung)
        if rung and _guarded_nodes(ranked, heads, k) == _guarded_nodes(ranked, heads, _guarded_count(ranked, rung - 1)):
            return   # the rung would keep no more nodes than the last
        suffix = "-guarded" if rung == 0 else f"-guarded-{k}"
        plan.append((f"openvino-int8{suffix}", "int8", "f32", ("guarded", k, rung)))
        if has_bf16:
            plan.append((f"openvino-int8-bf16{suffix}", "int8+bf16", "bf16", ("guarded", k, rung)))

    index = 0
    skip_int8 = None
    while index < len(plan):
        name, precision, hint, int8_kind = plan[index]
        index += 1
        row = EngineRow(name, "openvino", precision, _requirements("openvino", precision))
        rows.append(row)
        if int8_kind and skip_int8 is None:
            skip_int8 = _float_far_behind(runners, ort_row.name, _stack(eval_feeds), max(batches))
        if int8_kind and skip_int8:
            row.status, row.note = "skipped", skip_int8
            continue
        t0 = time.perf_counter()
        try:
            model, row.ignored_nodes = build_int8(int8_kind[:2] if isinstance(int8_kind, tuple) else int8_kind) \
                if int8_kind else (base, 0)
            compiled = ovb.compile_for_timing(model, hint)
            request = compiled.create_infer_request()
            judge(row, lambda feed, r=request: r.infer(feed).to_tuple())
        except Exception as exc:  # a candidate OpenVINO cannot build or run is a result, not a crash
            row.note = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log(f"  {name}: failed ({row.note})")
            continue
        finally:
            row.build_s = round(time.perf_counter() - t0, 2)
        log(f"  {name}: min cosine {row.min_cosine:.5f} (built in {row.build_s:.1f} s)"
            f"{'' if row.status == 'ok' else ' - ' + row.note}")
        if row.status == "inaccurate" and int8_kind:
            # Like cpu_int8's guarded rung: the outlier-heavy MatMuls and output projections kept float,
            # then (while the bar is missed) twice as many MatMuls, by their measured outlier ratio.
            plan_guarded(0 if int8_kind == "plain" else int8_kind[2] + 1)
        if row.status == "ok":
            runners[name] = lambda feed, r=request: r.infer(feed).to_tuple()
            models[name] = (model, hint)

    if fallback != "fp32":   # else the fallback row is the reference itself
        rows.insert(0, EngineRow("onnxruntime-fp32", "onnxruntime", "fp32", [], status="reference", min_cosine=1.0,
                                 task_metric=judge.reference_task_metric))
    runners_with_ref = {"onnxruntime-fp32": lambda feed: fp32_sess.run(None, feed), **runners}
    held = _stack(eval_feeds)
    for batch in batches:
        feed = _feeds_at(held, batch)
        fns = {n: (lambda fn=fn: fn(feed)) for n, fn in runners_with_ref.items()}
        stats = measure_interleaved_within(fns, budget_s=timing_budget_s, max_iterations=30, min_iterations=5)
        ref_ms = stats["onnxruntime-fp32"].p50_ms
        for row in rows:
            if row.name in stats:
                row.p50_ms[str(batch)] = round(stats[row.name].p50_ms, 3)
                row.p50_ratio[str(batch)] = round(stats[row.name].p50_ms / ref_ms, 4)
    for row in rows:
        if row.p50_ratio and row.status != "reference":
            row.score = round(math.exp(sum(math.log(r) for r in row.p50_ratio.values()) / len(row.p50_ratio)), 4)

    ranked = sorted((r for r in rows if r.status == "ok" and r.score is not None), key=lambda r: r.score)
    variants: list[dict] = []
    carried: list[list[str]] = []
    for row in ranked:
        if row.name == ort_row.name:
            break  # the fallback is always carried (last); nothing slower than it is worth the bytes
        if len(variants) >= MAX_OPENVINO_VARIANTS or not _serves_new_hosts(row.requires_any, carried) \
                or (ort_row.score and row.score > CARRY_GAIN * ort_row.score):
            continue
        model, hint = models[row.name]
        variants.append({"name": row.name, "engine": "openvino", "precision": row.precision,
                         "requires_any": row.requires_any, "inference_precision": hint, "model": model,
                         "measured": _measured(row)})
        carried.append(row.requires_any)
        row.status = "carried"
    first = next((r for r in rows if variants and r.name == variants[0]["name"]), ort_row)
    first.status = "selected"   # what the compiling host runs (the others carried are for other hosts)
    log(format_table([r.to_dict() for r in rows], batches))
    return EngineChoice(rows, ort_row.name, variants, list(batches), round(time.perf_counter() - started, 2))


# OpenVINO INT8 ran 1.2-1.8x faster than OpenVINO BF16/FP32 on MiniLM-fused (here and on the AMX host of
# issue #20); when OpenVINO's best float candidate runs this many times slower than ORT INT8, INT8 cannot
# close the gap (per-call overhead dominates small models: 6-18x on the zoo's dual-encoder) and the NNCF
# builds (10-40 s) are skipped.
FLOAT_BEHIND_SKIP = 3.0


def _float_far_behind(runners: Mapping[str, Callable], ort_name: str, held: Mapping[str, np.ndarray],
                      batch: int) -> str:
    """A note when every OpenVINO float candidate ran > FLOAT_BEHIND_SKIP x ORT INT8's p50 (quick probe at the
    largest batch, where OpenVINO does best), else ''."""
    from ..parity.latency import measure_interleaved_within

    floats = [n for n in runners if n.startswith("openvino-")]
    if not floats:
        return ""
    feed = _feeds_at(held, batch)
    stats = measure_interleaved_within({n: (lambda fn=runners[n]: fn(feed)) for n in [ort_name, *floats]},
                                       budget_s=2.0, max_iterations=10, min_iterations=3)
    behind = min(stats[n].p50_ms for n in floats) / stats[ort_name].p50_ms
    if behind <= FLOAT_BEHIND_SKIP:
        return ""
    return (f"not built: OpenVINO's best float candidate ran {behind:.1f}x ORT INT8's p50 at batch {batch}, "
            f"more than INT8 recovers")


def _measured(row: EngineRow) -> dict:
    return {"p50_ratio": dict(row.p50_ratio), "score": row.score, "min_cosine": row.min_cosine}


def fallback_variant(row: EngineRow, backend_section: dict) -> dict:
    return {"name": row.name, "engine": row.engine, "precision": row.precision, "requires_any": row.requires_any,
            "backend": backend_section, "measured": _measured(row)}


def output_projections(model) -> list[str]:
    """The weighted nodes (constant weight) nearest each graph output, looking through weight-free ops and
    activation x activation MatMuls (a similarity head), stopping at normalisations: the embedding and
    class projections. (ort_recipes.final_projections stops at the first MatMul, a similarity head's.)"""
    from .ort_recipes import NORMALIZATION_OPS

    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {i.name for i in model.graph.initializer}
    constants.update(out for node in model.graph.node if node.op_type == "Constant" for out in node.output)
    found, seen = set(), set()
    frontier = [o.name for o in model.graph.output]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or id(node) in seen or node.op_type in NORMALIZATION_OPS:
            continue
        seen.add(id(node))
        if node.op_type in ("MatMul", "Gemm", "Conv") and any(i in constants for i in node.input[1:2]):
            if node.name:
                found.add(node.name)
            continue
        frontier.extend(i for i in node.input if i and i not in constants)
    return sorted(found)


def _outlier_ranking(fp32_onnx: Path, calib_feeds: Sequence[dict]) -> tuple[list[tuple[str, float]], set[str]]:
    """What INT8 hurts, measured on calibration samples as cpu_int8's guarded rung does: the constant-weight
    MatMuls by the max|x|/rms of their input, most outlier-heavy first (BERT's outlier channels), and the
    projections feeding the outputs (embeddings, class heads)."""
    import tempfile

    import onnx

    from .ort_calib import check_calib, input_specs, split_feeds
    from .ort_recipes import final_projections, outlier_ratios

    specs = input_specs(onnx.load(str(fp32_onnx), load_external_data=False))
    feeds = split_feeds(check_calib(_stack(calib_feeds[:4]), specs, fp32_onnx), specs)
    with tempfile.TemporaryDirectory(prefix=".edgemm-sensitive-", dir=Path(fp32_onnx).parent) as work:
        ratios = outlier_ratios(Path(fp32_onnx), feeds[:4], Path(work))
    heads = set(output_projections(onnx.load(str(fp32_onnx), load_external_data=False)))
    ranked = sorted(ratios.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked, heads | set(final_projections(fp32_onnx))


def _guarded_count(ranked: Sequence[tuple[str, float]], rung: int) -> int:
    """MatMuls rung ``rung`` keeps float: those past GUARD_OUTLIER_RATIO (at least one), doubled per rung."""
    first = max(1, sum(1 for _, r in ranked if r > GUARD_OUTLIER_RATIO))
    return min(len(ranked), first * 2 ** rung)


def _guarded_nodes(ranked: Sequence[tuple[str, float]], heads: set[str], count: int) -> set[str]:
    return {n for n, _ in ranked[:count]} | set(heads)


def engine_search_for(fp32_onnx: Path, selection, calib: Mapping[str, np.ndarray],
                      held_out: Mapping[str, np.ndarray] | None, *, batches: Sequence[int], min_cosine: float,
                      min_top1: float | None = None, max_metric_drop: float | None = None,
                      exclude: Sequence[str] = (), log: Callable[[str], None] = print, task=None,
                      labelled: tuple[Mapping[str, np.ndarray], np.ndarray] | None = None) -> EngineChoice:
    """search_engines on the samples cpu_int8.select_recipe used: its calibration feeds and held-out feeds.
    ``selection``: select_recipe's result (its model is the ORT INT8 fallback), or None when no ORT INT8
    recipe met the bar: the FP32 model is then the fallback, and OpenVINO's candidates compete with it
    (BF16 often keeps FP32 accuracy where INT8 cannot)."""
    import onnx

    from ..hostinfo import host_isa
    from .cpu_int8 import split_samples
    from .ort_calib import check_calib, input_specs, split_feeds
    from .exclusions import resolve_exclude

    n_calib, n_eval = (selection.calib_samples, selection.eval_samples) if selection else (16, 64)
    model = onnx.load(str(fp32_onnx), load_external_data=False)
    specs = input_specs(model)
    feeds = split_feeds(check_calib(calib, specs, fp32_onnx), specs)
    if held_out is not None:
        calib_feeds = feeds[:n_calib]
        eval_feeds = split_feeds(check_calib(held_out, specs, "held-out samples"), specs)[:n_eval]
    else:
        calib_feeds, eval_feeds, _ = split_samples(feeds, n_calib, n_eval)
    ignored = resolve_exclude(model, exclude) if exclude else []
    del model
    scoring = {"task": task, "labelled": labelled, "min_top1": min_top1, "max_metric_drop": max_metric_drop}
    if selection is None:
        log(f"CPU engine search: OpenVINO candidates for this host against ONNX Runtime FP32, "
            f"batch {', '.join(map(str, batches))}")
        return search_engines(fp32_onnx, fp32_onnx, {}, calib_feeds, eval_feeds, batches=batches,
                              min_cosine=min_cosine, isa=host_isa(), ignored=ignored, log=log, fallback="fp32",
                              **scoring)
    disabled = selection.recipe.params.get("ort_disabled_optimizers") or ()
    log(f"CPU engine search: OpenVINO candidates for this host against ONNX Runtime INT8 "
        f"({selection.recipe.name}), batch {', '.join(map(str, batches))}")
    return search_engines(fp32_onnx, selection.path, {"disabled_optimizers": disabled}, calib_feeds, eval_feeds,
                          batches=batches, min_cosine=min_cosine, isa=host_isa(), ignored=ignored, log=log,
                          **scoring)
