"""A Triton Inference Server model configuration (config.pbtxt) from a bundle's manifest.

The configuration is built as plain data (``ModelConfig`` field names, the schema in Triton's
model_config.proto) and written in protobuf text format by ``to_pbtxt``. Hand-written on purpose: the
exporter must run where only the runtime is installed (no protobuf / tritonclient); the tests parse every
flavor's output with tritonclient's ``model_config_pb2`` to hold it to the real schema.
Standard library and edgemm's torch-free modules only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..backends import registry
from ..errors import InputError
from ..iospec import TensorSpec
from ..runtime.manifest import Manifest

FLAVORS = ("edgemm", "native")
KINDS = ("cpu", "gpu")
# numpy dtype names (what manifests record) -> Triton data types (model_config.proto DataType)
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
}
PYTHON_MODEL_FILE = "model.py"
BUNDLE_FOLDER = "bundle"          # the bundle's copy inside <model>/<version>/ (edgemm flavor)


class Enum(str):
    """A protobuf enum value: written bare (TYPE_FP32), not quoted."""


@dataclass(frozen=True)
class TritonOptions:
    """What the user chose for the served model (the CLI's flags)."""
    flavor: str = "edgemm"
    max_batch: int | None = None          # lower the bundle's batch bound
    instances: int = 1
    kind: str | None = None               # cpu | gpu; None: where the bundle's runtime runs
    preferred_batch: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    require_signature: bool = False       # the served model loads only with a trusted signature
    monitor: bool = False                 # edgemm flavor: the runtime monitor's input checks as metrics
    notes: list = field(default_factory=list, compare=False)


@dataclass(frozen=True)
class Batching:
    """How requests may be batched: ``max_batch`` > 0 when axis 0 of every input and output is one
    symbolic batch dim found nowhere else; ``reason`` says why not otherwise. ``merge`` is False when a
    client's batch is fine but merging requests is not (``reason`` then says why)."""
    dim: str | None
    max_batch: int
    reason: str = ""
    merge: bool = True


def _fail(what: str, field_: str, fix: str, source) -> InputError:
    return InputError(what, file=source, field=field_, fix=fix)


def find_batching(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Batching:
    """Triton batches requests along axis 0 and splits the outputs back along axis 0, so it may only
    batch when every input and output starts with the same symbolic dim and no tensor has it on another
    axis: an output spanning the batch twice (a [batch, batch] similarity) mixes requests."""
    first = [s.shape[0] if s.shape else None for s in inputs]
    dim = first[0]
    if not isinstance(dim, str) or any(d != dim for d in first):
        return Batching(None, 0, "the inputs do not share a symbolic batch axis 0")
    for spec in inputs + outputs:
        if not spec.shape or spec.shape[0] != dim:
            return Batching(None, 0, f"{spec.name!r} has no {dim!r} axis 0")
        if dim in spec.shape[1:]:
            return Batching(None, 0, f"{spec.name!r} spans {dim!r} on more than one axis "
                                     f"({list(spec.shape)}), so batched requests would mix")
    lows = [s.ranges[dim].min for s in inputs if dim in s.ranges]
    highs = [s.ranges[dim].max for s in inputs if dim in s.ranges]
    if not highs:
        return Batching(None, 0, f"the manifest gives no range for {dim!r}")
    if max(lows) > 1:
        return Batching(None, 0, f"{dim!r} must be at least {max(lows)}, and Triton sends single requests")
    return Batching(dim, min(highs))


def _dims(spec: TensorSpec, skip_batch: bool) -> list[int]:
    shape = spec.shape[1:] if skip_batch else spec.shape
    return [d if isinstance(d, int) else -1 for d in shape]


def tensor_entry(spec: TensorSpec, skip_batch: bool, source, key: str) -> dict:
    dtype = TRITON_TYPES.get(spec.dtype)
    if dtype is None:
        raise _fail(f"dtype {spec.dtype!r} has no Triton type", f"{key}.{spec.name}", "recompile the bundle",
                    source)
    dims = _dims(spec, skip_batch)
    entry = {"name": spec.name, "data_type": Enum(dtype), "dims": dims}
    if not dims:  # a scalar per request: Triton wants dims [1] reshaped to []
        entry.update(dims=[1], reshape={"shape": []})
    return entry


def check_options(options: TritonOptions) -> None:
    """Flag values wrong whatever the bundle (one line each)."""
    if options.flavor not in FLAVORS:
        raise _fail(f"unknown flavor {options.flavor!r}", "--flavor", f"use one of {', '.join(FLAVORS)}", None)
    if options.kind is not None and options.kind not in KINDS:
        raise _fail(f"unknown kind {options.kind!r}", "--kind", "use cpu or gpu", None)
    if not isinstance(options.instances, int) or not 1 <= options.instances <= 256:
        raise _fail(f"{options.instances!r} instances", "--instances", "use 1 to 256", None)
    if options.max_batch is not None and not 1 <= options.max_batch <= 1 << 20:
        raise _fail(f"{options.max_batch!r} is not a batch size", "--max-batch", "use a size >= 1", None)
    if options.monitor and options.flavor != "edgemm":
        raise _fail("the monitor runs in edgemm's runtime", "--monitor", "use --flavor edgemm", None)
    if not 0 <= options.max_queue_delay_us <= 60_000_000:
        raise _fail(f"{options.max_queue_delay_us!r} µs", "--max-queue-delay-us", "use 0 to 60000000", None)
    if any(b < 1 for b in options.preferred_batch):
        raise _fail("preferred batch sizes must be >= 1", "--preferred-batch", "e.g. --preferred-batch 4", None)


def model_config(name: str, manifest: Manifest, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 options: TritonOptions, *, source: Path | str | None = None, lenient: bool = False,
                 rows_mix: str | None = None, unbatched: str | None = None) -> dict:
    """The ModelConfig (as data) serving one bundle under ``name``. ``options.notes`` collects what the
    user should know (batching off, settings a backend ignores). Batching flags for a bundle that cannot
    batch are refused, or only noted with ``lenient`` (several bundles share the flags; the caller then
    refuses them when no bundle batches). ``rows_mix``: why one row's result depends on the other rows of
    its batch (dynamic INT8: activation scales over the whole batch); then a client's own batch runs as
    sent, but requests are never merged (no dynamic batcher), so an answer never depends on other clients.
    ``unbatched``: why batching is off whatever this model's own IO says (an ensemble decides for all parts)."""
    check_options(options)
    batching = Batching(None, 0, unbatched) if unbatched else find_batching(inputs, outputs)
    if batching.max_batch and rows_mix:
        batching = Batching(batching.dim, batching.max_batch, rows_mix, merge=False)
    max_batch = batching.max_batch
    flags = [f for f, given in (("--max-batch", options.max_batch is not None),
                                ("--preferred-batch", bool(options.preferred_batch)),
                                ("--max-queue-delay-us", bool(options.max_queue_delay_us))) if given]
    if not max_batch:
        if flags and not lenient:
            raise _fail(f"requests to this bundle cannot be batched ({batching.reason})", flags[0],
                        "leave the batching flags out", source)
        options.notes.append(f"{name}: max_batch_size 0, requests are not batched together: {batching.reason}")
    elif not batching.merge:
        merge_flags = [f for f in flags if f != "--max-batch"]
        if merge_flags and not lenient:
            raise _fail(f"requests to this bundle must not be merged ({batching.reason})", merge_flags[0],
                        "leave the batching flags out, or recompile with a static INT8 recipe", source)
        options.notes.append(f"{name}: no dynamic batching (each request runs as its client batched it): "
                             f"{batching.reason}")
    if max_batch:
        if options.max_batch is not None:
            if options.max_batch > max_batch:
                raise _fail(f"{options.max_batch} is above the bundle's batch bound {max_batch}", "--max-batch",
                            f"use at most {max_batch}, or recompile with a larger range", source)
            max_batch = options.max_batch
        too_big = [b for b in options.preferred_batch if b > max_batch] if batching.merge else []
        if too_big:
            raise _fail(f"{too_big[0]} is above max_batch_size {max_batch}", "--preferred-batch",
                        f"use sizes up to {max_batch}", source)

    backend, section = registry.get(manifest.backend.name), manifest.backend.section
    device = backend.device
    kind = options.kind or device
    if options.flavor == "edgemm" and kind != device:
        raise _fail(f"this bundle's runtime runs on the {device.upper()}, not the {kind.upper()}", "--kind",
                    f"use --kind {device}, or --flavor native", source)
    if kind not in backend.triton_kinds:
        raise _fail(f"a {backend.title} model runs on the {' or '.join(k.upper() for k in backend.triton_kinds)} "
                    f"only", "--kind", f"use --kind {backend.triton_kinds[0]}", source)
    refusal = backend.serving_refusal(section)
    if refusal is not None:   # neither flavor can serve it
        raise _fail(*refusal, source)
    batched = max_batch > 0
    config: dict = {"name": name}
    if options.flavor == "edgemm":
        config.update(backend="python", default_model_filename=PYTHON_MODEL_FILE)
    else:
        config.update(backend.triton_platform(section, lambda what, field_, fix: _fail(what, field_, fix, source),
                                              options.notes, manifest.name))
    config["max_batch_size"] = max_batch
    config["version_policy"] = {"latest": {"num_versions": 1}}
    config["input"] = [tensor_entry(s, batched, source, "inputs") for s in inputs]
    config["output"] = [tensor_entry(s, batched, source, "outputs") for s in outputs]
    if batched and batching.merge:
        dyn: dict = {}
        if options.preferred_batch:
            dyn["preferred_batch_size"] = sorted(set(options.preferred_batch))
        dyn["max_queue_delay_microseconds"] = options.max_queue_delay_us
        config["dynamic_batching"] = dyn
    group: dict = {"count": options.instances, "kind": Enum(f"KIND_{kind.upper()}")}
    profiles = backend.triton_profiles(section) if options.flavor == "native" else 0
    if profiles > 1:
        group["profile"] = [str(i) for i in range(profiles)]
    config["instance_group"] = [group]
    params = dict(config.pop("parameters", {}))
    if options.flavor == "edgemm":
        params["edgemm.require_signature"] = "true" if options.require_signature else "false"
        params["edgemm.monitor"] = "true" if options.monitor else "false"
    if params:
        config["parameters"] = [{"key": k, "value": {"string_value": v}} for k, v in params.items()]
    return config


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format for a message given as data: str -> quoted string, Enum -> bare name,
    bool/int -> literal, dict -> nested message, list of scalars -> [a, b], list of dicts -> repeated
    message (also how map fields are written: entries with key and value)."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines.append(f"{pad}{key} {{\n{to_pbtxt(item, indent + 1)}{pad}}}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c, c if ord(c) >= 32 else f"\\{ord(c):03o}") for c in value) + '"'
    raise TypeError(f"cannot write {type(value).__name__} in text format")
