"""One loaded bundle, many threads: results identical to single-threaded runs."""

from __future__ import annotations

import threading

import numpy as np

from edgemm import runtime
from tests.fixtures.tiny_models import make_data

THREADS = 8
CALLS = 500


def test_threads_get_the_single_threaded_outputs(tiny_bundle):
    bundle = runtime.load(tiny_bundle)
    # Distinct inputs of several batch sizes, so a mix-up between threads cannot go unnoticed.
    inputs = [make_data(1 + i % 4, seed=100 + i) for i in range(24)]
    expected = [bundle.run(feeds) for feeds in inputs]
    assert len({e["logits"].tobytes() for e in expected}) == len(inputs)
    start = threading.Barrier(THREADS)
    failures: list[str] = []
    calls = [0] * THREADS

    def worker(k: int) -> None:
        start.wait()
        try:
            for i in range(CALLS):
                j = (7 * i + 3 * k) % len(inputs)
                got = bundle.run(inputs[j])
                if got.keys() != expected[j].keys() or not all(
                        np.array_equal(got[name], expected[j][name]) for name in got):
                    failures.append(f"thread {k} call {i}: outputs for input {j} differ")
                calls[k] += 1
        except Exception as exc:  # reported below with the thread that raised it
            failures.append(f"thread {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert calls == [CALLS] * THREADS
