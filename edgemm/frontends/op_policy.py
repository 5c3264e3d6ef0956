"""Which operators a model program may call when edgemm runs it without ``--trust-pickle``.

TorchScript archives and ``.pt2`` programs are programs: running one runs every operator in its graphs,
and a few torch operators reach outside the tensors (``aten::from_file`` maps a file into a tensor and,
with ``shared=True``, writes through to it; ``aten::save`` writes a file; ``prim::PythonOp`` calls Python;
``prim::rpc_*`` open sockets). Both frontends ask this module before anything runs.

The policy is an allow-list, decided per namespace (torch has no purity metadata to derive it from):
- ``aten``: the ATen operator registry of the torch that is running, minus the reviewed operators below
  that reach files, streams, sockets or process state, and minus every operator whose schema mentions a
  type that is not a plain value (storages, RRefs, capsules, streams, custom C++ classes). ATen is
  ~1,700 operator names (3,700 overloads), mostly generated from native_functions.yaml and computing
  on tensors; listing them by hand would rot, so the registry is the list and the review is the
  exception table (tests/robustness/test_model_programs.py re-checks it against the registry).
- ``prim``: a hand-kept list (the namespace is small, and its members are interpreter internals:
  control flow, containers, attribute access; optimizer-only nodes a saved program never needs are out).
- higher-order operators (``.pt2``): a hand-kept list of the ones that only run their own subgraphs.
- every other namespace (extension libraries, ``quantized``, ``c10d``, ``profiler``, custom ops) is refused:
  an operator nobody reviewed is not assumed pure.
"""

from __future__ import annotations

from functools import lru_cache

# ATen operators whose schemas look pure but which reach outside the tensors (reviewed against the
# registry: every aten op with a str argument, and every op that returns nothing without mutating a
# tensor). The reason is shown to the user.
ATEN_SIDE_EFFECTS = {
    "aten::from_file": "maps a file into a tensor (shared=True writes through to the file)",
    "aten::save": "writes a file",
    "aten::_print": "writes to the process's standard output",
    "aten::manual_seed": "reseeds the process's random generator",
    "aten::seed": "reseeds the process's random generator",
    "aten::backward": "runs the autograd engine",
    "aten::_backward": "runs the autograd engine",
    "aten::dist_backward": "runs distributed autograd (network)",
    "aten::get_gradients": "reads distributed autograd state",
    "aten::_cufft_clear_plan_cache": "changes process-wide CUDA state",
    "aten::_cufft_set_plan_cache_max_size": "changes process-wide CUDA state",
}

# prim operators a saved program may use: containers, numbers, tensor queries, and the interpreter's own
# instructions (which have no schema). Print, PythonOp, rpc_*, timing/statistics and optimizer-only
# groups (fusion, guards, MKLDNN, static runtime) are left out.
PRIM_ALLOWED = frozenset({
    # interpreter instructions
    "prim::Constant", "prim::GetAttr", "prim::SetAttr", "prim::CallMethod", "prim::CallFunction", "prim::If",
    "prim::Loop", "prim::TupleConstruct", "prim::TupleUnpack", "prim::TupleIndex", "prim::TupleSlice",
    "prim::ListConstruct", "prim::ListUnpack", "prim::DictConstruct", "prim::DictIndex", "prim::CreateObject",
    "prim::isinstance", "prim::unchecked_cast", "prim::unchecked_unwrap_optional", "prim::Uninitialized",
    "prim::RaiseException", "prim::Enter", "prim::Exit", "prim::fork", "prim::NumToTensor", "prim::ConstantChunk",
    "prim::ModuleContainerIndex", "prim::EnumName", "prim::EnumValue", "prim::IfThenElse", "prim::StringIndex",
    "prim::awaitable", "prim::awaitable_nowait", "prim::awaitable_wait", "prim::AutogradAdd", "prim::AutogradZero",
    "prim::AutogradAnyNonZero", "prim::AutogradAllZero", "prim::AutogradAllNonZero", "prim::BroadcastSizes",
    "prim::ChunkSizes", "prim::rangelist",
    # an @torch.jit.ignore'd function left as a stub: calling it only raises
    "prim::IgnoredPythonOp",
    # tensor and number queries
    "prim::abs", "prim::data", "prim::device", "prim::dtype", "prim::grad", "prim::id", "prim::index",
    "prim::is_cpu", "prim::is_cuda", "prim::is_ipu", "prim::is_maia", "prim::is_meta", "prim::is_mkldnn",
    "prim::is_mps", "prim::is_mtia", "prim::is_nested", "prim::is_quantized", "prim::is_sparse",
    "prim::is_sparse_csr", "prim::is_vulkan", "prim::is_xla", "prim::is_xpu", "prim::itemsize", "prim::layout",
    "prim::max", "prim::min", "prim::name", "prim::nbytes", "prim::requires_grad", "prim::tolist", "prim::type",
})

PRIM_REASONS = {
    "prim::PythonOp": "calls a Python function",
    "prim::Print": "writes to the process's standard output",
    "prim::rpc_async": "makes a remote call (network)",
    "prim::rpc_sync": "makes a remote call (network)",
    "prim::rpc_remote": "makes a remote call (network)",
}

# Higher-order operators (.pt2) that only run subgraphs stored in the same program (which are checked
# node by node). Left out: those that call Python or native code held elsewhere (flat_apply,
# invoke_leaf_function, autograd_function_apply, inline_asm_elementwise, *_call_delegate,
# inductor_compiled_code, call_torchbind), effect tokens (with_effects, print), custom-op wrappers
# (auto_functionalized*), and checkpoint/RNG state machinery.
HIGHER_ORDER_ALLOWED = frozenset({
    "cond", "while_loop", "while_loop_stack_output", "map_impl", "scan", "associative_scan",
    "wrap_with_set_grad_enabled", "wrap_with_autocast", "hints_wrapper", "invoke_subgraph", "flex_attention",
    "out_dtype",
})

# Type kinds a pure operator's schema may mention: values, containers of values, and generic type variables.
_VALUE_TYPE_KINDS = frozenset({
    "TensorType", "IntType", "FloatType", "ComplexType", "BoolType", "NumberType", "StringType", "NoneType",
    "ListType", "TupleType", "DictType", "OptionalType", "UnionType", "DeviceObjType", "GeneratorType", "VarType",
    "AnyType", "AnyClassType", "AnyEnumType", "AnyListType", "AnyTupleType", "QSchemeType", "SymIntType",
    "SymFloatType", "SymBoolType", "FutureType", "AwaitType", "LayoutType", "ScalarTypeType", "MemoryFormatType",
})
_TYPE_NAMES = {"StorageType": "a storage (raw memory, possibly file-backed)", "RRefType": "a remote reference",
               "CapsuleType": "an opaque native object", "StreamObjType": "a device stream",
               "ClassType": "a custom C++ class"}

def operator_refusal(name: str) -> str | None:
    """None when the operator ``ns::op`` may run without trust; otherwise why not, in a few words."""
    namespace = name.split("::", 1)[0] if "::" in name else ""
    if namespace == "prim":
        if name in PRIM_ALLOWED:
            return None
        return PRIM_REASONS.get(name, "is not a pure tensor operator")
    if namespace != "aten":
        return f"is from the {namespace or '(no)'} namespace, which edgemm does not run without trust"
    if name in ATEN_SIDE_EFFECTS:
        return ATEN_SIDE_EFFECTS[name]
    verdict = _aten_registry().get(name)
    if verdict is None:
        return "is not an operator of this torch's ATen registry"
    return verdict or None


def higher_order_refusal(name: str) -> str | None:
    return None if name in HIGHER_ORDER_ALLOWED else "is a higher-order operator that runs code from outside the program"


def type_refusal(jit_type) -> str | None:
    """Why a graph value of this TorchScript type is refused: custom C++ classes (their methods are native
    code some library registered) and the non-value kinds above, also inside containers."""
    stack = [jit_type]
    while stack:
        t = stack.pop()
        if "torch.classes." in t.str():
            return "is a custom C++ class whose methods run native code"
        if t.kind() in _TYPE_NAMES and t.kind() != "ClassType":  # script classes and modules are fine
            return f"is {_TYPE_NAMES[t.kind()]}"
        stack.extend(t.containedTypes())
    return None


@lru_cache(maxsize=1)
def _aten_registry() -> dict[str, str]:
    """Every ATen operator name -> '' when all its overloads take and return plain values only, or the
    reason one does not."""
    import torch

    verdicts: dict[str, str] = {}
    for schema in torch._C._jit_get_all_schemas():  # no public API lists registered operators
        if not schema.name.startswith("aten::"):
            continue
        reason = verdicts.get(schema.name, "")
        for arg in (*schema.arguments, *schema.returns):
            bad = _non_value_kind(arg.type)
            if bad:
                reason = reason or f"takes or returns {_TYPE_NAMES.get(bad, bad)}"
        verdicts[schema.name] = reason
    return verdicts


def _non_value_kind(jit_type) -> str | None:
    stack = [jit_type]
    while stack:
        t = stack.pop()
        kind = t.kind()
        if kind not in _VALUE_TYPE_KINDS:
            return kind
        stack.extend(t.containedTypes())
    return None


TRUST_FIX = "re-export the model from plain torch operators, or pass --trust-pickle if you trust the file's author"
