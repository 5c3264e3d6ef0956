"""Structured pruning on the zoo models: size, FLOPs, ONNX Runtime latency and task metric, side by side.

    python benchmarks/bench_prune.py                      # dual-encoder + cross-attention, 30%, recovery
    python benchmarks/bench_prune.py --minilm             # + the MiniLM text tower inside a fused model
    python benchmarks/bench_prune.py --int8 --json out.json

For each model: prune ``--ratio`` of every prunable group (attention heads, MLP hidden channels, conv
channels, transformer residual width), measure the task metric on the zoo's eval split before pruning,
after pruning, and after ``--recover`` distillation steps on ``--calib-size`` unlabeled samples of the
calibration split (labels are never used); export both models to FP32 ONNX
and time them in ONNX Runtime (CPU) *interleaved* (edgemm.parity.latency.measure_interleaved), so the
printed ratios come from one run under the same load. With ``--int8`` the recovered model is saved as a
.pt2 and compiled with ``edgemm compile --int8`` (ONNX Runtime CPU recipe) against the eval set: the
bundle must pass verification.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemm.parity.latency import measure_interleaved  # noqa: E402


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # As edgemm.runtime does: with spinning on, the idle pool of one interleaved session steals the cores
    # from the other and skews the ratio (a batch-1 run read 0.51 with spinning, 0.87 without).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module, name: str, input_names, inputs, example, path: Path) -> None:
    from edgemm.export import export_onnx
    from edgemm.frontends.base import LoadedModel
    from edgemm.iospec import DimRange, TensorSpec

    specs = [TensorSpec(n, str(inputs[n].dtype), ("batch",) + tuple(inputs[n].shape[1:]),
                        {"batch": DimRange(1, 8, 64)}) for n in input_names]
    loaded = LoadedModel(source=name, format="factory", sha256="", name=name, module=module,
                         input_names=list(input_names))
    export_onnx(loaded, specs, {k: example[k][:2] for k in input_names}, {k: example[k][:3] for k in input_names},
                path)


def _latency(paths: dict[str, Path], inputs, input_names, batches, iterations, threads) -> dict:
    sessions = {label: _session(p, threads) for label, p in paths.items()}
    out = {}
    for batch in batches:
        feeds = {k: np.ascontiguousarray(inputs[k][:batch]) for k in input_names}
        stats = measure_interleaved({label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()},
                                    warmup=10, iterations=iterations)
        out[batch] = {label: s.to_dict() for label, s in stats.items()}
        out[batch]["p50_ratio"] = stats["pruned"].p50_ms / stats["unpruned"].p50_ms
    return out


def _onnx_metric(path: Path, name: str, data) -> float:
    from edgemm import zoo
    from edgemm.parity import task_metrics

    card = zoo.get(name)
    sess = _session(path, None)
    # Exported outputs are named by position (output_0, ...); the card lists them in the same order.
    outs = dict(zip(card.outputs, sess.run(None, {k: data[k] for k in card.input_names})))
    return task_metrics.compute(card.metric, outs, data["labels"], card.metric_outputs)


def _int8_bundle(module, name: str, calib, evald, work: Path) -> dict:
    """Save the pruned model as .pt2 and compile it with --int8 against the eval set."""
    import torch

    from edgemm import zoo
    from edgemm.pipeline import compile_model
    from edgemm.pipeline.sidecar import EXAMPLE_SIDECAR
    from edgemm.config import CompileConfig

    card = zoo.get(name)
    folder = work / f"{name}-pruned"
    folder.mkdir()
    args = tuple(torch.from_numpy(np.ascontiguousarray(calib[k][:4])) for k in card.input_names)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module.eval(), args, dynamic_shapes={k: {0: batch} for k in card.input_names})
    torch.export.save(program, folder / "model.pt2")
    np.savez(folder / "calib.npz", **{k: calib[k][:256] for k in card.input_names})
    np.savez(folder / "eval.npz", **{k: evald[k] for k in card.input_names}, labels=evald["labels"])
    # The bundle names outputs after the program's pytree (a lone tensor is "output", a tuple
    # "output_0", ...); point the metric at those names.
    from edgemm.reference import flatten_outputs

    with torch.no_grad():
        flat_names, _ = flatten_outputs(module(*args))
    rename = dict(zip(card.outputs, flat_names))
    (folder / EXAMPLE_SIDECAR).write_text(json.dumps({"zoo": name, "metric": card.metric,
                                                      "metric_outputs": [rename[o] for o in card.metric_outputs]}))
    cfg = CompileConfig(model=str(folder / "model.pt2"), output=str(work / f"{name}-bundle"), precision="int8",
                        calib=str(folder / "calib.npz"), eval=str(folder / "eval.npz"), force=True)
    result = compile_model(cfg, say=lambda _msg: None)
    report = result.report or {}
    recipe = result.manifest["precision"].get("recipe")
    return {"passed": bool(report.get("passed")), "recipe": recipe.get("name") if isinstance(recipe, dict) else recipe,
            "failures": report.get("failures", []), "task": report.get("task")}


def bench_zoo(name: str, args, work: Path) -> dict:
    from edgemm import zoo
    from edgemm.prune import prune, recover
    from edgemm.prune.measure import branch_times
    from edgemm.zoo.evaluate import score

    card = zoo.get(name)
    teacher = zoo.build(name)
    calib = zoo.make_data(name, "calib", args.calib_size)
    evald = zoo.make_data(name, "eval")
    names = list(card.input_names)
    example = {k: calib[k][:4] for k in names}
    t0 = time.perf_counter()
    pruned, report = prune(teacher, example, calib, {"*": args.ratio})
    prune_s = time.perf_counter() - t0
    metric = {"unpruned": score(name, teacher, evald), "pruned": score(name, pruned, evald)}
    rec = None
    if args.recover:
        rec = recover(pruned, teacher, calib, args.recover, progress=not args.quiet)
        metric["recovered"] = score(name, pruned, evald)
    paths = {"unpruned": work / f"{name}-unpruned.onnx", "pruned": work / f"{name}-pruned.onnx"}
    for label, module in (("unpruned", teacher), ("pruned", pruned)):
        _export(module, name, names, calib, example, paths[label])
    metric["pruned_onnx"] = _onnx_metric(paths["pruned"], name, evald)
    latency = _latency(paths, evald, names, args.batches, args.iterations, args.threads)
    torch_ms = branch_times({"unpruned": teacher, "pruned": pruned}, names,
                            {k: evald[k][:max(args.batches)] for k in names},
                            {b: v["modules"] for b, v in report["branches"].items()})
    result = {"model": name, "ratio": args.ratio, "prune_seconds": round(prune_s, 2), "metric_name": card.metric,
              "metric": metric, "recovery": rec, "latency_onnx": latency, "torch_branch_ms": torch_ms,
              "onnx_bytes": {k: p.stat().st_size for k, p in paths.items()},
              "prune_report": {k: report[k] for k in ("branches", "total", "attention", "groups", "check")}}
    if args.int8:
        result["int8_bundle"] = _int8_bundle(pruned, name, calib, evald, work)
    return result


def bench_minilm(args, work: Path) -> dict:
    """The BERT-style text tower inside a fused model. No task labels exist for it: accuracy is the
    cosine of the pruned model's outputs to the unpruned ones on held-out inputs."""
    import torch

    from edgemm.prune import prune, recover
    from edgemm.zoo.minilm_fused import build_minilm_fused, make_inputs

    teacher = build_minilm_fused(pretrained="auto")
    names = ["input_ids", "attention_mask", "pixel_values"]
    calib = make_inputs(args.minilm_calib, seed=1)
    held = make_inputs(16, seed=2)
    example = {k: calib[k][:2] for k in names}
    t0 = time.perf_counter()
    pruned, report = prune(teacher, example, calib, {"*": args.ratio})
    prune_s = time.perf_counter() - t0

    def cosine(model) -> dict:
        with torch.no_grad():
            args_ = tuple(torch.from_numpy(held[k]) for k in names)
            ref, got = teacher(*args_), model(*args_)
        return {n: float(torch.nn.functional.cosine_similarity(r, g, dim=-1).mean())
                for n, r, g in zip(("text_embeds", "image_embeds", "fused_logits"), ref, got)}

    fidelity = {"pruned": cosine(pruned)}
    rec = None
    if args.minilm_recover:
        rec = recover(pruned, teacher, calib, args.minilm_recover, lr=1e-4, batch=8, progress=not args.quiet)
        fidelity["recovered"] = cosine(pruned)
    paths = {"unpruned": work / "minilm-unpruned.onnx", "pruned": work / "minilm-pruned.onnx"}
    for label, module in (("unpruned", teacher), ("pruned", pruned)):
        _export(module, "minilm-fused", names, calib, example, paths[label])
    latency = _latency(paths, held, names, [1, 4], max(10, args.iterations // 5), args.threads)
    return {"model": "minilm-fused", "pretrained_text": bool(teacher.pretrained), "ratio": args.ratio,
            "prune_seconds": round(prune_s, 2), "output_cosine_vs_unpruned": fidelity, "recovery": rec,
            "latency_onnx": latency, "onnx_bytes": {k: p.stat().st_size for k, p in paths.items()},
            "prune_report": {k: report[k] for k in ("branches", "total", "attention", "groups", "check")}}


def _print(result: dict) -> None:
    print(f"\n== {result['model']} (prune {result['ratio']:.0%} of each prunable group)")
    rep = result["prune_report"]
    for branch, b in rep["branches"].items():
        print(f"  {branch:7s} params {b['params_before']:>10,} -> {b['params_after']:>10,} "
              f"({b['params_after'] / max(b['params_before'], 1):.2f}x)   FLOPs {b['flops_before']:>13,} -> "
              f"{b['flops_after']:>13,} ({b['flops_after'] / max(b['flops_before'], 1):.2f}x)   "
              f"heads -{b['heads_removed']}, channels -{b['channels_removed']}")
    t = rep["total"]
    print(f"  total   params {t['params_after'] / t['params_before']:.2f}x   "
          f"FLOPs {t['flops_after'] / t['flops_before']:.2f}x"
          f"   ONNX bytes {result['onnx_bytes']['pruned'] / result['onnx_bytes']['unpruned']:.2f}x")
    if "metric" in result:
        m = result["metric"]
        line = "  ".join(f"{k} {v:.2f}" for k, v in m.items())
        print(f"  {result['metric_name']}: {line}")
    if "output_cosine_vs_unpruned" in result:
        for k, v in result["output_cosine_vs_unpruned"].items():
            print(f"  cosine to unpruned ({k}): " + ", ".join(f"{n} {c:.4f}" for n, c in v.items()))
    if result.get("recovery"):
        r = result["recovery"]
        print(f"  recovery: {r['steps']} steps in {r['seconds']:.1f}s, distillation loss {r['loss_before']:.4f} -> "
              f"{r['loss_after']:.4f}")
    for batch, lat in result["latency_onnx"].items():
        print(f"  ORT FP32 batch {batch:>3}: p50 {lat['unpruned']['p50_ms']:.3f} ms -> {lat['pruned']['p50_ms']:.3f} ms"
              f"  ratio {lat['p50_ratio']:.3f}")
    if "torch_branch_ms" in result:
        tb = result["torch_branch_ms"]
        print("  torch ms per branch: " + ", ".join(
            f"{b} {tb['unpruned'][b]:.2f}->{tb['pruned'][b]:.2f}" for b in tb["unpruned"]))
    if "int8_bundle" in result:
        r = result["int8_bundle"]
        print(f"  --int8 bundle of the pruned model: {'verifies' if r['passed'] else 'FAILS'} (recipe {r['recipe']})"
              + ("" if r["passed"] else f": {r['failures']}"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dual-encoder,cross-attention")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--recover", type=int, default=1500, help="distillation steps (0: none)")
    parser.add_argument("--calib-size", type=int, default=1024,
                        help="unlabeled calibration samples for channel ranking and recovery")
    parser.add_argument("--batches", default="1,8,32", help="ORT batch sizes to time")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    parser.add_argument("--minilm", action="store_true", help="also the MiniLM-fused model")
    parser.add_argument("--minilm-calib", type=int, default=64)
    parser.add_argument("--minilm-recover", type=int, default=40, help="distillation steps for MiniLM")
    parser.add_argument("--int8", action="store_true", help="compile the pruned model with --int8 and verify")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    warnings.simplefilter("ignore")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        work = Path(tmp)
        for name in [m for m in args.models.split(",") if m]:
            results.append(bench_zoo(name, args, work))
            _print(results[-1])
        if args.minilm:
            results.append(bench_minilm(args, work))
            _print(results[-1])
    if args.json:
        tmp_path = Path(args.json).with_name(f".{Path(args.json).name}.tmp-{os.getpid()}")
        tmp_path.write_text(json.dumps({"host_cpus": os.cpu_count(), "results": results}, indent=2, default=str))
        os.replace(tmp_path, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
