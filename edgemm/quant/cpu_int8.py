"""INT8 for ONNX Runtime on CPU: named recipes, how to apply them, and how to pick one by measurement.

Why a selection and not one fixed recipe (measured on a MiniLM-L6 + conv fused model with real
pretrained text weights, 2-core AVX-512 VNNI CPU, ORT 1.32; ratios are INT8 p50 / FP32 p50):

* ``quantize_dynamic`` with its defaults also quantizes Conv (ConvInteger: ~4x slower than FP32 Conv here)
  and the embedding Gather: ratio ~0.87-0.95, text cosine 0.936. Restricting it to MatMul: ratio ~0.5.
* Per-tensor weights: text cosine 0.935; per-channel weights: 0.990-0.991 at the same speed, so
  per-tensor is dominated and not a default candidate.
* The remaining error comes from activation outliers: inputs of the FFN down-projections have
  max|x|/rms(x) of 60-100 (BERT's outlier channels) and one dynamic per-tensor activation scale cannot
  serve them. Leaving the MatMuls whose input ratio exceeds 50 (and the output heads) in FP32 brings the
  text cosine to 0.996 for ~+0.06-0.16 of the FP32 time: the "guarded" rung, built only when the plain
  one misses ``min_cosine``. Embedding Gathers are never quantized (no speed gain, accuracy loss).
* Static QOperator U8S8 per-channel (const-B MatMul + Conv): fast (~0.46-0.6) but text cosine 0.94-0.95
  (calibrated activation ranges); with the FFN down-projections in FP32 it reaches 0.994.
* Static QDQ S8S8: 1.0-1.5x FP32, i.e. no faster (dominated, kept in ``ALL_RECIPES`` only). Dynamic Conv is slow, so the
  dynamic recipes quantize Conv statically (QLinearConv U8S8), calibrated on the calibration samples.
* ORT transformer fusions: see ``ort_fusions``; no measurable gain, opt-in only.
* ORT 1.32's CPU SkipLayerNormalization kernel is several times slower than the Add + LayerNormalization
  it fuses; each accurate candidate (and FP32) is timed with and without that session fusion and the
  winner's setting is recorded in the recipe as ``ort_disabled_optimizers`` for the runtime to apply.
* Timing pitfall: ORT sessions spin their intra-op threads after each run. Interleaving several
  sessions on 2 cores with spinning on inflated every p50 ~3x; timing sessions here disable spinning.

Here: the selection (build each candidate recipe's plan, measure it against FP32, time the accurate
ones interleaved, keep the fastest) and ``apply_recipe`` for a recipe pinned by name. The recipes and
their guards are in ``ort_recipes`` (the uniform planner), the one INT8 build in ``ort_int8``
(the quantizer), calibration feeds in ``ort_calib``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError, ParityError, storage_error
from ..onnx_io import cpu_session, remove_model
from .ort_calib import check_calib, split_feeds
from .ort_int8 import OrtInt8Quantizer, quiet_ort_quantizer_logs
from .ort_recipes import ALL_RECIPES, Int8Recipe, RecipePlanner, candidate_recipes, dominated_by

__all__ = ["Int8Recipe", "ALL_RECIPES", "candidate_recipes", "apply_recipe", "select_recipe", "Selection",
           "CandidateResult", "output_agreement", "agreement_of", "run_all", "split_samples", "SESSION_VARIANTS", "cpu_session", "quiet_ort_quantizer_logs"]


JUDGE_BATCH = 16  # samples per call when judging: the compile gate's and verify's call size (iospec.call_batch)


def _judge_calls(feeds: list[dict], specs: dict) -> list[dict]:
    """Held-out one-sample feeds regrouped into calls of ``JUDGE_BATCH`` samples when the batch is dynamic.
    An output that mixes the samples of a call (a CLIP-style [B, B] similarity) is judged at the call size
    the compile gate and verify use; one sample per call made it [1, 1], whose cosine is only its sign.
    Calls are of equal size so that such outputs stack; a remainder is left out unless it is all there is."""
    fixed = any(dims and dims[0] for _, dims in specs.values())
    if fixed or len(feeds) < 2:
        return list(feeds)
    size = min(JUDGE_BATCH, len(feeds))
    groups = [feeds[i:i + size] for i in range(0, len(feeds) - size + 1, size)]
    return [{k: np.concatenate([f[k] for f in group]) for k in group[0]} for group in groups]


# ORT session settings timed for every accurate candidate (and for FP32, so ratios stay fair); the
# winner's non-default setting goes into the recipe as ``ort_disabled_optimizers`` for the runtime.
# Why: ORT 1.32's CPU SkipLayerNormalization kernel ran 6x slower (2 threads; 10x on 1 thread) than the
# Add + LayerNormalization it replaces (12 ops of [1, 128, 384]: 2.3 ms vs 0.4 ms), and in the MiniLM INT8
# model it was the second most expensive op.
SESSION_VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "no_skip_layernorm_fusion": ("SkipLayerNormFusion",),
}


def apply_recipe(recipe: Int8Recipe, fp32_onnx: Path, out_onnx: Path, calib: dict[str, np.ndarray], *,
                 exclude: Sequence[str] = ()) -> dict:
    """Write ``out_onnx``: ``fp32_onnx`` quantized by ``recipe``, calibrated on all of ``calib``, the
    ``exclude`` patterns (quant/exclusions.py) kept in FP32; returns {"excluded_nodes": [...]}."""
    out_onnx = Path(out_onnx)
    with tempfile.TemporaryDirectory(prefix=".edgemm-int8-", dir=out_onnx.parent) as work:
        quantizer = OrtInt8Quantizer(Path(fp32_onnx), calib, Path(work))
        planner = RecipePlanner(quantizer, exclude)
        return quantizer.build(out_onnx, planner.plan(recipe, quantizer.calib_feeds))


# --------------------------------------------------------------------------------------------------
# Accuracy and selection

def output_agreement(ref: np.ndarray, got: np.ndarray, precision: str | None = None) -> tuple[str, float]:
    """("cosine", mean per-sample cosine) for float outputs, ("equal", fraction equal) for the rest; with a
    ``precision``, near-zero samples are skipped as the parity gate skips them (agreement_of)."""
    found = agreement_of(ref, got, precision)
    return found["metric"], found["value"]


def agreement_of(ref: np.ndarray, got: np.ndarray, precision: str | None = None) -> dict:
    """{"metric": "cosine"|"equal", "value": x} and, for float outputs with near-zero samples, their count and
    how many exceed the atol (parity/metrics.py:CosineCount, the gate's own count; precision None: no
    sample is near-zero)."""
    ref, got = np.asarray(ref), np.asarray(got)
    floating = np.issubdtype(ref.dtype, np.floating)
    if ref.shape != got.shape:
        return {"metric": "cosine" if floating else "equal", "value": 0.0}
    if not floating:
        return {"metric": "equal", "value": float(np.mean(ref == got)) if ref.size else 1.0}
    if not np.all(np.isfinite(got)):
        return {"metric": "cosine", "value": 0.0}
    from ..parity.metrics import CosineCount
    from ..precision import spec

    count = CosineCount(spec(precision).score_noise if precision else 0.0)
    count.add(ref, got)
    fields = count.fields()
    out = {"metric": "cosine", "value": float(fields["mean_cosine"])}
    if fields.get("near_zero_samples"):
        out.update(near_zero=fields["near_zero_samples"], near_zero_over=fields["near_zero_over"],
                   near_zero_atol=fields["near_zero_atol"])
    return out


def top1_agreement(ref: np.ndarray, got: np.ndarray, precision: str = "int8") -> float | None:
    """Agreement of argmax over the decisive rows (all axes but the last) as the parity gate counts it
    (parity/metrics.py:Top1Count, near-ties by ``precision``'s noise); None when too few are decisive."""
    from ..parity.metrics import Top1Count
    from ..precision import spec

    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return 0.0
    count = Top1Count(spec(precision).score_noise)
    count.add(ref, got)
    return count.agreement


def _scored_outputs(model_path: Path, names: Sequence[str], reference: Sequence[np.ndarray]) -> set[str]:
    """The class-score outputs (parity/output_kinds.py: the graph and the values decide, as the gate does)."""
    import onnx

    from ..parity.output_kinds import SCORES, graph_score_outputs, value_kind

    heads = graph_score_outputs(onnx.load(str(model_path), load_external_data=False))
    return {n for n, ref in zip(names, reference) if value_kind(ref, heads.get(n)) == SCORES}


def _near_zero_off(row: "CandidateResult") -> str | None:
    """The first float output with a near-zero sample beyond its atol (parity/metrics.py:CosineCount)."""
    return next((n for n, a in row.agreement.items() if a.get("near_zero_over")), None)


def _top1_short(row: "CandidateResult", min_top1: float) -> str | None:
    """The first class-score output whose top-1 agreement is under ``min_top1``, if any."""
    return next((n for n, a in row.agreement.items() if "top1" in a and a["top1"] < min_top1), None)


def run_all(sess, feeds: Sequence[dict]) -> list[np.ndarray]:
    """Outputs over all feeds, concatenated along axis 0 (one array per model output)."""
    runs = [[np.atleast_1d(np.asarray(value)) for value in sess.run(None, feed)] for feed in feeds]
    return [np.concatenate([run[i] for run in runs]) for i in range(len(runs[0]))]


@dataclass
class CandidateResult:
    name: str
    params: dict
    status: str  # "selected" | "ok" | "inaccurate" | "dominated" | "failed" | "out of time"
    ok: bool = False
    min_agreement: float | None = None
    agreement: dict = field(default_factory=dict)  # output -> {"metric": "cosine"|"equal", "value": x[, "top1": t]}
    p50_ms: float | None = None
    p50_ratio: float | None = None  # vs FP32, measured interleaved in the same run
    session: str | None = None  # the SESSION_VARIANTS entry it was fastest with
    build_s: float | None = None
    excluded_nodes: list = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Selection:
    recipe: Int8Recipe
    path: Path
    table: list[CandidateResult]
    fp32_p50_ms: float
    min_cosine: float
    eval_samples: int
    calib_samples: int
    seconds: float

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "path": str(self.path), "fp32_p50_ms": self.fp32_p50_ms,
                "min_cosine": self.min_cosine, "eval_samples": self.eval_samples,
                "calib_samples": self.calib_samples, "seconds": self.seconds,
                "table": [row.to_dict() for row in self.table]}


def split_samples(feeds: list[dict], max_calib: int, max_eval: int) -> tuple[list[dict], list[dict], str]:
    """Calibration feeds first, held-out evaluation feeds last (edgemm.data.hold_out); they overlap
    only with < 2 feeds."""
    from ..data import hold_out

    split = hold_out(len(feeds), max_judge=max_eval)
    return feeds[split.calibrate][:max_calib], feeds[split.judge], split.note


def _time_candidates(fp32_onnx: Path, models: Sequence[tuple[str, Path]], feed: dict,
                     iterations: int) -> tuple[float, dict[str, tuple[float, str]]]:
    """Interleaved p50 of FP32 and each model under each session variant that applies.

    Returns (best FP32 p50 ms, {name: (best p50 ms, variant)}). FP32 gets its best variant too, so that a
    session setting is never credited to quantization.
    """
    import onnx

    from ..parity.latency import measure_interleaved

    has_layernorm = any(n.op_type == "LayerNormalization"
                        for n in onnx.load(str(fp32_onnx), load_external_data=False).graph.node)
    variants = {k: v for k, v in SESSION_VARIANTS.items() if has_layernorm or not v}
    fns, sessions = {}, []
    for name, path in [("fp32", fp32_onnx), *models]:
        for variant, disabled in variants.items():
            sess = cpu_session(path, spinning=False, disabled_optimizers=disabled)
            sessions.append(sess)
            fns[(name, variant)] = (lambda s=sess: s.run(None, feed))
    stats = measure_interleaved(fns, warmup=3, iterations=iterations)
    best: dict[str, tuple[float, str]] = {}
    for (name, variant), st in stats.items():
        if name not in best or st.p50_ms < best[name][0]:
            best[name] = (round(st.p50_ms, 3), variant)
    fp32_ms = best.pop("fp32")[0]
    return fp32_ms, best


def select_recipe(fp32_onnx: Path, calib: dict[str, np.ndarray], workdir: Path, *, min_cosine: float = 0.99,
                  candidates: Sequence[Int8Recipe] | None = None, log: Callable[[str], None] | None = None,
                  max_calib_samples: int = 16, max_eval_samples: int = 64, timing_iterations: int = 30,
                  time_budget_s: float = 90.0, exclude: Sequence[str] = (),
                  held_out: Mapping[str, np.ndarray] | None = None, min_top1: float | None = None) -> Selection:
    """Build each candidate, keep those whose every output agrees with FP32 to ``min_cosine`` (and whose
    class-score outputs keep FP32's top-1 to ``min_top1``, the INT8 gate's bar by default: the search and
    the compile gate judge alike), time them interleaved with FP32 and return the fastest. Raises
    ``ParityError`` if none is accurate enough.

    ``held_out``: samples to pick on (never calibrated on); without it, the tail of ``calib`` is held out.
    Float outputs are scored by mean per-sample cosine, other outputs by the fraction of equal elements;
    both must reach ``min_cosine``. Guarded variants of a recipe that already passed are skipped (they
    only add FP32 nodes). Candidates not started within ``time_budget_s`` are reported "out of time".
    """
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    candidates = list(candidates if candidates is not None else candidate_recipes())
    if not candidates:
        raise InputError("no INT8 candidate recipes given", field="candidates", fix="omit it to use the defaults")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names) or "fp32" in names:
        raise InputError(f"candidate recipe names must be unique and not 'fp32': {names}", field="candidates",
                         fix="rename the recipes")
    quantizer = OrtInt8Quantizer(Path(fp32_onnx), calib, workdir)
    try:
        planner = RecipePlanner(quantizer, exclude)
        if held_out is not None:
            calib_feeds, split_note = quantizer.feeds[:max_calib_samples], ""
            eval_feeds = split_feeds(check_calib(held_out, quantizer.specs, "held-out samples"), quantizer.specs)
            eval_feeds = eval_feeds[:max_eval_samples]
        else:
            calib_feeds, eval_feeds, split_note = split_samples(quantizer.feeds, max_calib_samples, max_eval_samples)
        quantizer.calib_feeds = calib_feeds
        timing_feed, eval_samples = eval_feeds[0], len(eval_feeds)  # one call's feed; feeds as before grouping
        eval_feeds = _judge_calls(eval_feeds, quantizer.specs)
        if split_note:
            say(f"warning: {split_note}")
        fp32_sess = cpu_session(quantizer.source, spinning=False)
        output_names = [o.name for o in fp32_sess.get_outputs()]
        reference = run_all(fp32_sess, eval_feeds)
        scored = _scored_outputs(quantizer.source, output_names, reference)
        if min_top1 is None:
            from ..precision import spec

            min_top1 = spec("int8").min_top1_agreement
        say(f"INT8 selection: {len(candidates)} candidates, {len(calib_feeds)} calibration / "
            f"{len(eval_feeds)} held-out calls, min cosine {min_cosine}")

        table: list[CandidateResult] = []
        passing: list[tuple[Int8Recipe, Path, object, CandidateResult]] = []  # recipe, file, session, row
        for index, recipe in enumerate(candidates):
            row = CandidateResult(recipe.name, dict(recipe.params), status="failed")
            table.append(row)
            dominated = dominated_by(recipe, [p[0] for p in passing])
            if dominated:
                row.status, row.note = "dominated", f"{dominated} already met min_cosine with fewer FP32 nodes"
                continue
            if time.perf_counter() - started > time_budget_s:
                row.status, row.note = "out of time", f"time budget {time_budget_s:.0f} s spent"
                continue
            path = workdir / f"int8_{index}_{recipe.name}.onnx"
            t0 = time.perf_counter()
            try:
                facts = quantizer.build(path, planner.plan(recipe, calib_feeds))
                sess = cpu_session(path, spinning=False)
                outputs = run_all(sess, eval_feeds)
            except InputError:
                raise
            except Exception as exc:  # a recipe ORT cannot apply to this graph is a result, not a crash
                if (disk := storage_error(exc)) is not None:
                    raise disk from exc
                row.note = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                row.build_s = round(time.perf_counter() - t0, 2)
                say(f"  {recipe.name}: failed ({row.note})")
                remove_model(path)
                continue
            row.build_s = round(time.perf_counter() - t0, 2)
            row.excluded_nodes = facts["excluded_nodes"]
            for name, ref, got in zip(output_names, reference, outputs):
                found = agreement_of(ref, got, "int8")
                row.agreement[name] = {**found, "value": round(found["value"], 6)}
                if name in scored and (agree := top1_agreement(ref, got)) is not None:
                    row.agreement[name]["top1"] = round(agree, 6)
            row.min_agreement = min(v["value"] for v in row.agreement.values())
            short = _top1_short(row, min_top1)
            off = _near_zero_off(row)
            row.ok = row.min_agreement >= min_cosine and short is None and off is None
            row.status = "ok" if row.ok else "inaccurate"
            why = (" - below min_cosine" if row.min_agreement < min_cosine else
                   f" - near-zero samples of '{off}' off by more than atol" if off else
                   f" - top-1 agreement {row.agreement[short]['top1']:.4f} < {min_top1} on '{short}'" if short else "")
            say(f"  {recipe.name}: min agreement {row.min_agreement:.5f} ({len(row.excluded_nodes)} nodes kept FP32, "
                f"built in {row.build_s:.1f} s){why}")
            if row.ok:
                passing.append((recipe, path, sess, row))
            else:
                del sess
                remove_model(path)

        if not passing:
            best = max((r for r in table if r.min_agreement is not None), key=lambda r: r.min_agreement, default=None)
            reached = (f"best {best.name}: {best.min_agreement:.4f} on "
                       f"'{min(best.agreement, key=lambda k: best.agreement[k]['value'])}'") if best else "no candidate ran"
            if best is not None and best.min_agreement >= min_cosine and (short := _top1_short(best, min_top1)):
                reached = f"best {best.name}: top-1 agreement {best.agreement[short]['top1']:.4f} on '{short}'"
            elif best is not None and best.min_agreement >= min_cosine and (off := _near_zero_off(best)):
                a = best.agreement[off]
                reached = (f"best {best.name}: {a['near_zero_over']} of {a['near_zero']} near-zero samples of '{off}' "
                           f"off by more than atol {a['near_zero_atol']:.3g}")
            raise ParityError(f"no INT8 recipe reached min cosine {min_cosine} and top-1 agreement {min_top1} on "
                              f"every output ({reached})",
                              file=fp32_onnx, field="int8",
                              fix="compile with --fp16 or --fp32, lower the tolerance, or use a mixed precision")

        del fp32_sess
        fp32_ms, timed = _time_candidates(quantizer.source, [(r.name, path) for r, path, _, _ in passing],
                                          timing_feed, timing_iterations)
        for _, _, _, row in passing:
            row.p50_ms, row.session = timed[row.name]
            row.p50_ratio = round(row.p50_ms / fp32_ms, 4)
        chosen_recipe, chosen_path, _, chosen_row = min(passing, key=lambda p: p[3].p50_ms)
        chosen_row.status = "selected"
        disabled = SESSION_VARIANTS[chosen_row.session]
        if disabled:
            chosen_recipe = Int8Recipe(chosen_recipe.name,
                                       {**chosen_recipe.params, "ort_disabled_optimizers": list(disabled)})
            chosen_row.params = dict(chosen_recipe.params)
        for _, path, _, row in passing:
            if row is not chosen_row:
                remove_model(path)
        passing.clear()
        seconds = round(time.perf_counter() - started, 2)
        say(f"INT8 selected {chosen_recipe.name}: p50 {chosen_row.p50_ratio:.3f}x FP32, min agreement "
            f"{chosen_row.min_agreement:.5f} ({seconds:.0f} s)")
        return Selection(chosen_recipe, chosen_path, table, round(fp32_ms, 3), min_cosine, eval_samples,
                         len(calib_feeds), seconds)
    finally:
        quantizer.cleanup()
