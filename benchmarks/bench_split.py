"""Split bundles (``edgemm compile --split``) on the zoo dual encoder: zero-shot classification with cached
prompt embeddings, and independent branches run concurrently vs one after the other.

    python benchmarks/bench_split.py                 # FP32 bundles, 1000 prompts
    python benchmarks/bench_split.py --json out.json --prompts 1000 --iterations 30

Two comparisons, each timed *interleaved* in one run (edgemm.parity.latency.measure_interleaved), so the
printed ratios share the machine's load:

1. Zero-shot, per image, against ``--prompts`` prompts: the split bundle with the text branch cached
   (``bundle.run({"image": img}, reuse={"text": cached})``: the vision tower on one image plus the
   similarity head) vs the fused bundle, which takes image and text in pairs and so recomputes both
   towers on every call (``fused.run({"image": img repeated N times, "input_ids": N prompts})``; the
   scores of the image are row 0 of its logits). That is what a fused deployment must do per frame.
2. The split pipeline with its independent branches (vision, text) on a thread pool vs one after the
   other (``rt.load(path, concurrent=True/False)``), at batch 1 and 8, with each part on ONNX Runtime's
   default intra-op threads and on one thread (``intra_op_threads=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemm.parity.latency import measure_interleaved  # noqa: E402


def _prompt_ids(n: int) -> np.ndarray:
    """``n`` prompt token rows: the zoo's 144 class prompts in all four caption templates (576), cycled."""
    from edgemm.zoo import vocab
    from edgemm.zoo.datasets import TEXT_LENGTH
    from edgemm.zoo.shapes import COLORS, GRID_POSITIONS, SHAPES

    texts = []
    for c in COLORS:
        for s in SHAPES:
            for p in GRID_POSITIONS:
                texts += [f"a {c} {s} in the {p}", f"the {s} in the {p} is {c}", f"{p} : {c} {s}",
                          f"there is a {c} {s} at the {p} of the picture"]
    ids = np.stack([vocab.encode(t, TEXT_LENGTH) for t in texts])
    return np.resize(ids, (n, ids.shape[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from edgemm import runtime as rt
    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig
    from edgemm.hostinfo import cpu_info
    from edgemm.zoo import write_example

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ex = write_example("dual-encoder", tmp / "de")
        names = "image_embeds,text_embeds,logits_per_image"
        quiet = dict(say=lambda m: None)
        split = compile_model(CompileConfig(model=str(ex["exported_program"]), output=str(tmp / "split"),
                                            calib=str(ex["calib"]), split=True, output_names=names), **quiet)
        fused = compile_model(CompileConfig(model=str(ex["exported_program"]), output=str(tmp / "fused"),
                                            calib=str(ex["calib"]), output_names=names), **quiet)
        data = np.load(ex["eval"])
        image = data["image"][:1]
        prompts = _prompt_ids(args.prompts)
        s_bundle, f_bundle = rt.load(split.bundle), rt.load(fused.bundle)
        cached = s_bundle.part("text").run({"input_ids": prompts})   # once, not timed
        tiled = {"image": np.repeat(image, args.prompts, axis=0), "input_ids": prompts}
        a = s_bundle.run({"image": image}, reuse={"text": cached})["logits_per_image"][0]
        b = f_bundle.run(tiled)["logits_per_image"][0]
        assert np.abs(a - b).max() <= 1e-4, "the two paths must score the same"
        zero_shot = measure_interleaved({
            "split, text cached": lambda: s_bundle.run({"image": image}, reuse={"text": cached}),
            "fused, both towers": lambda: f_bundle.run(tiled)}, warmup=3, iterations=args.iterations)

        concurrency = {}
        ways = {f"{mode}{suffix}": rt.load(split.bundle, concurrent=mode == "concurrent", intra_op_threads=threads)
                for mode in ("sequential", "concurrent") for suffix, threads in (("", 0), (", 1 thread", 1))}
        for batch in (1, 8):
            feeds = {"image": data["image"][:batch], "input_ids": data["input_ids"][:batch]}
            concurrency[batch] = measure_interleaved({k: (lambda b=b: b.run(feeds)) for k, b in ways.items()},
                                                     warmup=5, iterations=args.iterations * 10)
        recorded = {"concurrent": split.manifest["pipeline"].get("concurrent"),
                    "intra_op_threads": split.manifest["backend"].get("intra_op_threads")}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "host": {"cpu": cpu_info(), "cores": os.cpu_count(), "load_average_1min": load},
        "prompts": args.prompts,
        "zero_shot_ms": {k: v.to_dict() for k, v in zero_shot.items()},
        "zero_shot_ratio_split_over_fused_p50": zero_shot["split, text cached"].p50_ms / zero_shot["fused, both towers"].p50_ms,
        "concurrency_ms": {str(b): {k: v.to_dict() for k, v in s.items()} for b, s in concurrency.items()},
        "concurrency_ratio_concurrent_over_sequential_p50": {
            f"{b}{suffix}": s["concurrent" + suffix].p50_ms / s["sequential" + suffix].p50_ms
            for b, s in concurrency.items() for suffix in ("", ", 1 thread")},
        "compile_recorded": recorded,
    }
    z = result["zero_shot_ms"]
    print(f"zero-shot over {args.prompts} prompts, per image (p50 ms): split with text cached "
          f"{z['split, text cached']['p50_ms']:.3f}, fused recomputing both towers {z['fused, both towers']['p50_ms']:.3f}"
          f" -> ratio {result['zero_shot_ratio_split_over_fused_p50']:.4f}")
    for b, s in concurrency.items():
        for suffix, label in (("", "ORT default threads"), (", 1 thread", "1 intra-op thread")):
            ratio = result["concurrency_ratio_concurrent_over_sequential_p50"][f"{b}{suffix}"]
            print(f"batch {b}, {label} (p50 ms): sequential {s['sequential' + suffix].p50_ms:.3f}, concurrent "
                  f"{s['concurrent' + suffix].p50_ms:.3f} -> ratio {ratio:.3f}")
    print(f"compile recorded {recorded}; load average {load}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
