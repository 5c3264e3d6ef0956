"""`edgemm bench`: latency of bundles (and optionally the torch reference) measured side by side,
interleaved in one run, reported as ratios to the first bundle — never as absolute claims."""

from __future__ import annotations

import json

import click

from .options import signature_options, trust_options, verbose_option


@click.command("bench")
@click.argument("bundles", nargs=-1, required=True, type=click.Path())
@click.option("--reference", type=click.Path(), help="Also time the source model (torch eager / ONNX).")
@click.option("--data", type=click.Path(), help="Take the first sample from this .npz (default: synthetic).")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size of the timed call.")
@click.option("--iterations", type=int, default=100, show_default=True, help="Timed calls per candidate.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed calls first.")
@click.option("--reuse", "reuse", multiple=True,
              help="Split bundles: also time the pipeline with PART's outputs given (a cached branch), e.g. text.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@signature_options
@verbose_option
def command(bundles, reference, data, batch, iterations, warmup, reuse, as_json, trusted_keys, require_signature):
    """Time BUNDLES (the first is the baseline of the ratios)."""
    from .. import runtime
    from ..display import printable
    from ..errors import InputError
    from ..parity.latency import measure_interleaved

    if iterations < 1 or warmup < 0 or batch < 1:
        raise InputError("--iterations and --batch must be >= 1, --warmup >= 0", field="--iterations",
                         fix="e.g. --iterations 100 --warmup 10 --batch 1")
    trust = trust_options(trusted_keys, require_signature)
    loaded = [runtime.load(b, **trust) for b in bundles]
    first = loaded[0]
    _check_batch(first, bundles[0], batch)
    feeds = _feeds(first, data, batch)
    ran = _batch_of(feeds, batch)
    if ran != batch:
        click.echo(f"note: {bundles[0]} runs batches of {ran} only (static batch); timed at batch {ran}, "
                   f"not --batch {batch}", err=True)
        batch = ran
    for b, path in zip(loaded[1:], bundles[1:]):
        if [(s.name, s.dtype) for s in b.inputs] != [(s.name, s.dtype) for s in first.inputs]:
            raise InputError("takes different inputs than the first bundle", file=path, field="inputs",
                             fix="compare bundles of the same model")
    fns = {}
    for b, path in zip(loaded, bundles):
        checked = b.check_feeds(feeds)
        label = f"{b.manifest.name} [{b.precision}] ({path})"
        if label in fns:  # a dict would silently merge the two rows
            raise InputError("given twice", file=path, field="BUNDLES", fix="name each bundle once")
        fns[label] = (lambda bb=b, ff=checked: bb.run(ff))
        for part in reuse:
            call = _reused_call(b, path, part, checked)
            if call is not None:
                fns[f"{label} [{part} reused]"] = call
    if reuse and not any(isinstance(b, runtime.PipelineBundle) for b in loaded):
        raise InputError("reuses a part of a split bundle; none of these bundles is split", field="--reuse",
                         fix="compile with --split, or drop --reuse")
    if reference:
        from ..frontends import load_model
        from ..reference import Reference

        ref = Reference(load_model(reference), [s.name for s in first.inputs])  # timing only: names unused
        fns[f"reference ({reference})"] = ref.callable_for(feeds)
    host = host_context()
    if host["jetson"] is not None and host["jetson"].get("clocks_locked") is False:
        # TensorRT Best Practices, "Performance Benchmarking": lock the clocks before timing on a Jetson.
        click.echo(f"warning: GPU clocks are not locked (power mode {host['jetson'].get('power_mode') or 'unknown'}): "
                   "timings vary from run to run; lock them first: sudo nvpmodel -m <mode> && sudo jetson_clocks",
                   err=True)
    stats = measure_interleaved(fns, warmup=warmup, iterations=iterations)
    base = next(iter(stats.values())).p50_ms
    rows = [{"name": k, **v.to_dict(), "p50_ratio_to_first": v.p50_ms / max(base, 1e-12)} for k, v in stats.items()]
    if as_json:
        click.echo(json.dumps({"batch": batch, "iterations": iterations, "host": host, "results": rows}, indent=2))
        return 0
    click.echo(f"{'candidate':60s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'p50 ratio':>10s}")
    for r in rows:
        click.echo(f"{printable(r['name'])[:60]:60s} {r['p50_ms']:9.3f} {r['p90_ms']:9.3f} {r['p99_ms']:9.3f} "
                   f"{r['p50_ratio_to_first']:10.3f}")
    click.echo(f"(batch {batch}, {iterations} interleaved iterations after {warmup} warm-up; ratios are the "
               "figures to trust on a noisy machine)")
    click.echo(f"host: {host_line(host)}")
    return 0


def host_context() -> dict:
    """What the figures were measured on: the CPU and its ISA, and on a Jetson its power mode and whether
    the GPU clocks were locked (standard library probes only; unknown fields are None)."""
    from ..backends.tensorrt.jetson import jetson_state
    from ..hostinfo import cpu_info

    return {"cpu": cpu_info(), "jetson": jetson_state()}


def host_line(host: dict) -> str:
    cpu = host["cpu"]
    line = f"{cpu['model']} ({cpu['machine']}; {', '.join(cpu['isa']) or 'no SIMD features known'})"
    jetson = host.get("jetson")
    if jetson is not None:
        locked = {True: "locked", False: "NOT locked", None: "unknown"}[jetson.get("clocks_locked")]
        line += f"; Jetson {jetson.get('release')}, power mode {jetson.get('power_mode') or 'unknown'}, GPU clocks {locked}"
    return line


def _check_batch(bundle, path, batch: int) -> None:
    """Refuse a --batch the bundle cannot run (beyond its batch range) or whose inputs alone would not
    fit in a quarter of this machine's memory, before anything is allocated."""
    import math
    import os

    from ..errors import InputError

    for spec in bundle.inputs:
        dim = spec.shape[0] if spec.shape else None
        if isinstance(dim, str) and dim in spec.ranges and batch > spec.ranges[dim].max:
            raise InputError(f"{batch} is beyond the batch range of {spec.name} ({spec.ranges[dim].min}.."
                             f"{spec.ranges[dim].max}) in {path}", field="--batch",
                             fix=f"pass --batch {spec.ranges[dim].max} or less")
    need = sum(math.prod(spec.concrete_shape(batch)) * _itemsize(spec.dtype) for spec in bundle.inputs)
    try:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        budget = 4 << 30
    if need > budget:
        raise InputError(f"{batch} needs {need / 2**30:.1f} GiB of inputs per call, more than a quarter of this "
                         f"machine's memory", field="--batch", fix="pass a smaller --batch")


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _batch_of(feeds, requested: int) -> int:
    """The batch the timed call really runs (axis 0 of the inputs; a static-batch bundle keeps its own)."""
    sizes = {v.shape[0] for v in feeds.values() if getattr(v, "ndim", 0) >= 1}
    return sizes.pop() if len(sizes) == 1 else requested


def _feeds(bundle, data, batch):
    import numpy as np

    if data:
        from ..data import check_token_ids, load_dataset

        ds = load_dataset(data, specs=bundle.inputs, allow_labels=True, role="--data")
        check_token_ids(ds, bundle.token_vocab)  # naming the file, before any call
        idx = np.arange(batch) % ds.num_samples
        return {k: np.ascontiguousarray(v[idx]) for k, v in ds.arrays.items()}
    rng = np.random.default_rng(0)
    feeds = {}
    for s in bundle.inputs:
        shape = s.concrete_shape(batch)
        if np.dtype(s.dtype).kind == "f":
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        else:
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(s.dtype)
    return feeds


def _reused_call(bundle, path, part: str, feeds):
    """Split bundles: the pipeline with ``part``'s outputs computed once beforehand (a cached branch)."""
    from .. import runtime

    if not isinstance(bundle, runtime.PipelineBundle):
        return None
    from ..errors import InputError

    if part not in bundle.parts:
        raise InputError(f"no part {part!r}", file=path, field="--reuse",
                         fix="name a tower: " + ", ".join(n for n in bundle.parts if not bundle.part(n).after))
    p = bundle.part(part)
    if any(s.name not in feeds for s in p.inputs):
        raise InputError(f"part {part} reads what other parts make; only a branch fed by the model's inputs is "
                         f"reused here", file=path, field="--reuse",
                         fix="name a tower: " + ", ".join(n for n in bundle.parts if not bundle.part(n).after))
    given = p.run({s.name: feeds[s.name] for s in p.inputs if s.name in feeds})
    needed = bundle._session.needed_inputs({part})
    rest = {k: v for k, v in feeds.items() if k in needed}
    return lambda: bundle.run(rest, reuse={part: given})
