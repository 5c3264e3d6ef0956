"""`edgemm verify` on a split bundle: each part on its own, beside the whole pipeline.

Every part runs alone, as a deployment would call it: a tower from the data only (the other modalities'
inputs are not given), a part downstream from what the standalone upstream parts returned (``reuse``).
For each part: the model outputs it makes, against the reference (mean cosine, max abs error) when one is
given, and everything it returns against the pipeline's own single run (they must agree to 1e-6: the cut,
the interface tensors and the reuse path carry exactly what the fused run carries)."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .metrics import CosineCount, cosine_failures

PIPELINE_TOLERANCE = 1e-6


def check_parts(bundle, data, *, reference_run: Callable | None, min_cosine: float, batch_size: int,
                score_noise: float = 0.0) -> dict:
    """{"parts": {name: {...}}, "failures": [...]} over ``data`` (an edgemm Dataset), in batches; cosine as
    verify counts it (metrics.py:CosineCount, near-zero samples by ``score_noise``, the precision's)."""
    names = [s.name for s in bundle.inputs]
    graph_outputs = {o.name for o in bundle.outputs}
    stats: dict[str, dict] = {p: {"outputs": {}, "max_diff_vs_pipeline": 0.0} for p in bundle.parts}
    cosines: dict[tuple[str, str], CosineCount] = {}
    errors: dict[tuple[str, str], float] = {}
    for start in range(0, data.num_samples, batch_size):
        feeds = {n: data.arrays[n][start:start + batch_size] for n in names}
        whole = bundle.run(feeds)
        ref = reference_run(feeds) if reference_run is not None else None
        alone: dict[str, dict] = {}
        for part_name in bundle.parts:
            part = bundle.part(part_name)
            given = {}
            for spec in part.inputs:
                if spec.name in feeds:
                    given[spec.name] = feeds[spec.name]
                else:
                    given[spec.name] = next(o[spec.name] for o in alone.values() if spec.name in o)
            alone[part_name] = out = part.run(given)
            # The same part inside the whole pipeline, its upstream parts given through reuse.
            again = bundle.run({n: feeds[n] for n in names if n in given},
                               reuse={p: alone[p] for p in bundle.parts if p != part_name and p in alone}) \
                if part.after else None
            row = stats[part_name]
            for name, value in out.items():
                if name in graph_outputs:
                    row["max_diff_vs_pipeline"] = max(row["max_diff_vs_pipeline"],
                                                      float(np.abs(value - whole[name]).max(initial=0.0)))
                    if ref is not None and name in ref:
                        got, want = np.asarray(value, np.float64), np.asarray(ref[name], np.float64)
                        cosines.setdefault((part_name, name), CosineCount(score_noise)).add(want, got)
                        errors[(part_name, name)] = max(errors.get((part_name, name), 0.0),
                                                        float(np.abs(got - want).max(initial=0.0)))
            if again is not None:
                for name, value in again.items():
                    row["max_diff_vs_pipeline"] = max(row["max_diff_vs_pipeline"],
                                                      float(np.abs(value - whole[name]).max(initial=0.0)))
    failures = []
    for part_name, row in stats.items():
        part = bundle.part(part_name)
        row.update(inputs=[s.name for s in part.inputs], precision=part.precision, placement=part.placement)
        for (p, name), count in cosines.items():
            if p == part_name:
                row["outputs"][name] = {**count.fields(), "max_abs_error": errors[(p, name)]}
                failures += [f"part {part_name}: {text.removeprefix('output ')}"
                             for text in cosine_failures(name, row["outputs"][name], min_cosine)]
        row["passed"] = row["max_diff_vs_pipeline"] <= PIPELINE_TOLERANCE and not any(
            f.startswith(f"part {part_name}:") for f in failures)
        if row["max_diff_vs_pipeline"] > PIPELINE_TOLERANCE:
            failures.append(f"part {part_name} run on its own differs from the pipeline by "
                            f"{row['max_diff_vs_pipeline']:.3g}")
    return {"parts": stats, "failures": failures}


def render_parts(report: Mapping) -> list[str]:
    """Markdown lines for report.md (edgemm.parity.report)."""
    parts = report.get("split_parts")
    if not parts:
        return []
    lines = ["", "| part (run on its own) | precision | outputs vs reference (mean cosine) | max diff vs pipeline | pass |",
             "|---|---|---|---|---|"]
    for name, row in parts.items():
        outs = ", ".join(f"{o} {v['mean_cosine']:.6f}" for o, v in row.get("outputs", {}).items()) or "–"
        lines.append(f"| {name} | {row.get('precision')} | {outs} | {row['max_diff_vs_pipeline']:.3g} | "
                     f"{'yes' if row.get('passed') else 'NO'} |")
    return lines
