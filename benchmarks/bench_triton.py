"""Triton + edgemm runtime (python backend, loopback HTTP) against edgemm.runtime called in-process.

    python benchmarks/bench_triton.py                          # zoo cross-attention FP32, 400 requests per cell
    python benchmarks/bench_triton.py --bundle engines/vqa --requests 1000 --json out.json

For each concurrency (1, 4, 16 by default) the same number of batch-``--batch`` requests is sent by that
many threads, first in-process (``bundle.run``) then to a real tritonserver serving the same bundle
exported with ``edgemm export triton`` (dynamic batching, ``--max-queue-delay-us``), alternating over
``--rounds`` rounds; throughput (requests/s) and p50/p99 latency per request, and Triton / in-process
ratios, in one run on one machine. Every request is bounded (``--timeout``) and so is the total
(``--requests`` per cell). Triton's perf_analyzer is not used: the PyPI package ``perf-analyzer`` 0.1.0
installed here is a placeholder without the binary, so this is a bounded loopback load generator
(tritonclient.http, one client per thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_REQUESTS = 100_000


def _zoo_bundle(work: Path, name: str) -> tuple[Path, Path]:
    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig
    from edgemm.zoo.example import write_example

    data = work / "data"
    write_example(name, data)
    out = work / "bench-bundle"
    compile_model(CompileConfig(model=str(data / "model.pt2"), output=str(out), calib=str(data / "calib.npz")),
                  say=lambda m: None)
    return out, data / "eval.npz"


def _feeds(bundle, data_path: Path | None, batch: int) -> dict:
    if data_path is not None:
        data = np.load(data_path)
        return {s.name: np.ascontiguousarray(data[s.name][:batch]) for s in bundle.inputs}
    rng = np.random.default_rng(0)
    feeds = {}
    for s in bundle.inputs:
        shape = s.concrete_shape(batch)
        feeds[s.name] = (rng.standard_normal(shape).astype(s.dtype) if s.dtype.startswith("float")
                         else np.zeros(shape, dtype=s.dtype))
    return feeds


def _drive(call, concurrency: int, requests: int) -> dict:
    """``requests`` calls of ``call(thread_state)`` from ``concurrency`` threads; per-call latency (ms)."""
    latencies: list[float] = []
    lock = threading.Lock()
    left = [requests]
    errors: list[BaseException] = []

    def worker():
        state: dict = {}
        mine = []
        try:
            while True:
                with lock:
                    if left[0] <= 0:
                        break
                    left[0] -= 1
                t0 = time.perf_counter()
                call(state)
                mine.append((time.perf_counter() - t0) * 1e3)
        except BaseException as exc:  # reported after the join: a failed cell must not look fast
            errors.append(exc)
        finally:
            if "client" in state:
                state["client"].close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    lat = np.asarray(latencies)
    return {"rps": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="a bundle to serve [default: the zoo cross-attention, FP32]")
    ap.add_argument("--zoo", default="cross-attention", help="zoo model to build when --bundle is not given")
    ap.add_argument("--data", type=Path, help=".npz with the bundle's inputs [default: the zoo eval set / random]")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=400, help="requests per cell (concurrency x side x round)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-queue-delay-us", type=int, default=500)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not all(1 <= c <= 256 for c in args.concurrency):
        ap.error(f"--requests 1..{MAX_REQUESTS}, --concurrency 1..256")

    import tritonclient.http as httpclient

    import edgemm.runtime as rt
    from edgemm.hostinfo import cpu_info
    from edgemm.serving import TritonOptions, TritonServer, export_triton

    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        work = Path(tmp)
        path, data_path = (args.bundle, args.data) if args.bundle else _zoo_bundle(work, args.zoo)
        bundle = rt.load(path)
        feeds = _feeds(bundle, data_path, args.batch)
        notes: list[str] = []
        repo = export_triton([path], work / "repository",
                             TritonOptions(max_queue_delay_us=args.max_queue_delay_us, instances=args.instances),
                             say=notes.append)
        model = path.name
        inputs = []
        for name, value in feeds.items():
            tensor = httpclient.InferInput(name, list(value.shape), httpclient.np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)

        def local(state):
            bundle.run(feeds)

        with TritonServer(repo, workdir=work / "server") as server:
            def remote(state):
                if "client" not in state:
                    state["client"] = httpclient.InferenceServerClient(
                        server.http_url, connection_timeout=args.timeout, network_timeout=args.timeout)
                state["client"].infer(model, inputs)

            for c in args.concurrency:   # warm-up: sessions, connections, the batcher's threads
                _drive(local, c, 2 * c)
                _drive(remote, c, 2 * c)
            rows = []
            for c in args.concurrency:
                runs = {"in-process": [], "triton": []}
                for r in range(args.rounds):   # alternating sides, so a load change hits both
                    order = [("in-process", local), ("triton", remote)]
                    for side, call in (order if r % 2 == 0 else order[::-1]):
                        runs[side].append(_drive(call, c, args.requests))
                med = {side: {k: statistics.median(run[k] for run in results) for k in results[0]}
                       for side, results in runs.items()}
                rows.append({"concurrency": c, **{f"{side}_{k}": v for side, m in med.items() for k, v in m.items()},
                             "rps_ratio": med["triton"]["rps"] / med["in-process"]["rps"],
                             "p50_ratio": med["triton"]["p50_ms"] / med["in-process"]["p50_ms"],
                             "p99_ratio": med["triton"]["p99_ms"] / med["in-process"]["p99_ms"]})
            stats = server.statistics(model)

    host = cpu_info()
    print(f"host: {host}")
    print(f"bundle {path.name} ({bundle.manifest['precision'].get('mode')}), batch {args.batch}, "
          f"{args.requests} requests per cell, median of {args.rounds} rounds, max_queue_delay "
          f"{args.max_queue_delay_us} us, {args.instances} instance(s)")
    print(f"Triton executions / inferences over the run: {stats['execution_count']} / {stats['inference_count']}")
    print("| concurrency | in-process req/s | Triton req/s | ratio | in-process p50 / p99 ms | Triton p50 / p99 ms "
          "| p50 ratio | p99 ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['in-process_rps']:.0f} | {row['triton_rps']:.0f} | {row['rps_ratio']:.2f} "
              f"| {row['in-process_p50_ms']:.2f} / {row['in-process_p99_ms']:.2f} "
              f"| {row['triton_p50_ms']:.2f} / {row['triton_p99_ms']:.2f} | {row['p50_ratio']:.1f} | {row['p99_ratio']:.1f} |")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "host": host, "stats": {k: stats[k] for k in
                                         ("execution_count", "inference_count")}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
