"""The parity stage: the staged bundle (run by its backend's parity runner) against the reference model,
judged by the precision's thresholds; the report written into the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..backends import registry
from ..config import CompileConfig
from ..data import Dataset
from ..frontends import LoadedModel
from ..iospec import call_batch
from ..onnx_io import load_graph
from .inputs import synth_feeds

if TYPE_CHECKING:
    from ..runtime.manifest import Manifest


def output_heads(path: Path) -> dict[str, bool]:
    """Which outputs a linear head or score function makes (parity.output_kinds): read by verify too."""
    from ..parity.output_kinds import graph_score_outputs

    return graph_score_outputs(load_graph(path))


def parity_report(stage: Path, manifest: Manifest, loaded: LoadedModel, specs, data: Dataset | None,
                   cfg: CompileConfig, say, original: LoadedModel | None = None,
                   judged_on: dict | None = None) -> dict | None:
    """Bundle vs reference on the eval set (or the calibration set): the bundle's parity report.

    ``original``: the unpruned model of a pruned compile. The reference is then the pruned model (the
    thresholds judge what precision changed), and ``vs_original`` adds the bundle against the unpruned
    model: what the user gets in the end, pruning included (against the pruned model alone a pruned FP32
    bundle reads cosine 1.000)."""
    from ..parity.thresholds import defaults_for, with_overrides
    from ..parity.verify import add_compile_sections, evaluate, write_reports
    from ..task import guess as guess_task, of_section as task_of_section
    from ..reference import Reference

    if data is None:
        data = Dataset(Path("synthetic"), synth_feeds(specs, 8, seed=1), None, "")
    ref = Reference(loaded, [s.name for s in specs],
                    None if loaded.onnx_path else manifest.output_names)
    runner = registry.get(manifest.backend.name).parity_runner(stage, manifest)
    if runner is None:
        say("parity: skipped (this bundle cannot run on this machine; see report)")
        report = {"passed": True, "skipped": "bundle cannot run here (portable TensorRT bundle); "
                                              "run `edgemm verify` on the device", "outputs": {}, "failures": []}
        write_reports(stage, report)
        return report
    run, simulated = runner
    thresholds = with_overrides(defaults_for(dict(manifest.precision.section)), min_cosine=cfg.min_cosine,
                                min_top1_agreement=cfg.min_top1, max_metric_drop=cfg.max_metric_drop)
    if cfg.accuracy_target:
        # The search already held the bundle to the user's own target on this data; the per-precision
        # defaults would judge it by a bar the user did not ask for. The report still shows every figure.
        # A task metric is in percent (task.compute), so a 100-point bar is "off" while staying a finite
        # number: with_overrides refuses inf (a user's inf would silently disable a check), and report.json
        # must stay strict JSON (inf is written as the non-standard `Infinity`).
        thresholds = with_overrides(thresholds, min_cosine=cfg.min_cosine if cfg.min_cosine is not None else -1.0,
                                    min_top1_agreement=0.0, max_metric_drop=100.0)
    heads = manifest.output_heads
    task_t = task_of_section(manifest.task) or guess_task(manifest.output_names, heads)
    say(f"parity: bundle vs reference on {judged_on['description'] if judged_on else 'synthetic inputs'}")
    report = evaluate(run, ref.run, data, thresholds, output_names=manifest.output_names,
                      task=task_t if data.labels is not None else None, heads=heads, batch_size=call_batch(specs))
    if judged_on:
        report["judged_on"] = judged_on
    report["bundle"] = {"name": manifest.name, "precision": manifest.precision.label,
                        "backend": manifest.backend.name, "target": manifest.target.name}
    variants = manifest.sections.get("variants")   # as written (runtime/variants.py parses the same list)
    if variants:   # a portable CPU bundle: the gate judged the variant this host runs
        from ..hostinfo import host_isa
        from ..runtime.variants import choose_variant

        choice = choose_variant(variants, host_isa())
        report["bundle"].update(backend=variants[choice.index]["backend"]["name"], variant=choice.name)
        say(f"  judged variant {choice.name} ({choice.reason}); the bundle also carries "
            f"{', '.join(v['name'] for v in variants if v['name'] != choice.name)}")
    if simulated:
        report["simulated"] = simulated
    if original is not None:
        report["vs_original"] = _vs_original(run, original, specs, manifest, data, thresholds, task_t, say)
    add_compile_sections(report, manifest)
    if cfg.accuracy_target:
        report["accuracy_target"] = {"expr": cfg.accuracy_target,
                                     "met": manifest.precision.recipe.get("met"),
                                     "measured": manifest.precision.recipe.get("measured")}
    write_reports(stage, report)
    return report


def _vs_original(run, original: LoadedModel, specs, manifest: Manifest, data: Dataset, thresholds, task_t, say) -> dict:
    """The pruned bundle against the unpruned model: figures only (pruning's loss was asked for; the
    gate stays on the bundle vs the pruned model, which isolates precision)."""
    from ..parity.verify import evaluate, vs_original_lines
    from ..reference import Reference

    names = manifest.output_names
    ref = Reference(original, [s.name for s in specs], None if original.onnx_path else names)
    got = evaluate(run, ref.run, data, thresholds, output_names=names, batch_size=call_batch(specs),
                   task=task_t if data.labels is not None else None, heads=manifest.output_heads)
    section = {"reference": "unpruned source model", "samples": got["samples"],
               "outputs": {n: {k: v for k, v in o.items() if k != "passed"} for n, o in got["outputs"].items()}}
    if "task" in got:
        section["task"] = got["task"]
    for line in vs_original_lines(section):
        say(line)
    return section
