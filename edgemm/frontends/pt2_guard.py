"""What makes a torch.export archive (.pt2) safe to hand to ``torch.export.load``.

``torch.export.load`` is documented as unsafe for untrusted files, and three paths in it run code from
the file: (1) pickled payloads (weights/constants marked ``use_pickle``, sample inputs) are unpickled
with ``weights_only=False``, even as a silent fallback; (2) symbolic shape expressions are parsed with
``sympy.sympify``, which evaluates Python; (3) graph node targets are resolved by ``getattr`` from the
``torch`` module, so ``torch.os.system`` is a valid target. Without ``--trust-pickle`` edgemm closes
all three: every pickle is forced through torch's weights-only unpickler, and before torch sees the
file, every node target must resolve to an operator that ``op_policy`` allows (pure tensor operators:
``torch.ops.aten.from_file`` is a torch operator too) and every expression must be plain arithmetic.
There is no public torch API for a safe load, hence this hand-written check.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, SecurityError
from .op_policy import TRUST_FIX, higher_order_refusal, operator_refusal

# Functions torch serializes as call targets besides operators: symbolic-shape arithmetic only.
_OPERATOR_FUNCS = ("getitem", "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv",
                   "mod", "pow", "truediv", "and_", "or_", "xor", "not_", "invert", "abs", "lshift", "rshift",
                   "matmul", "truth")
_SYM_FUNCS = ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt", "sym_sum",
              "_sym_sqrt")
_MATH_FUNCS = ("trunc", "ceil", "floor", "sqrt", "fabs", "exp", "log", "log2", "log10", "pow", "isnan",
               "isinf", "isfinite")

# Symbolic expressions are sympy ``srepr`` text: CamelCase constructors over ASCII names, numbers, operators,
# keyword flags and quoted symbol names / numbers, e.g. "FloorDiv(Symbol('s27', integer=True), Integer(2))".
_QUOTED = re.compile(r"'[A-Za-z0-9_.+\-]*'", re.ASCII)
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_ +\-*/%()<>=!,.&|~^]*", re.ASCII)
_CALLED_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.ASCII)
_DECIMAL = re.compile(r"(?<![A-Za-z0-9_])(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# Lower-case functions sympy prints; Python's builtins (exec, eval, getattr, ...) are all lower case.
_EXPR_LOWER_CALLS = frozenset({"sqrt", "floor", "ceiling", "exp", "log", "sign", "factorial"})
_MAX_EXPR_CHARS = 20_000

_MAX_JSON_BYTES = 256 << 20   # a model.json this large is not a model; refuse before parsing it


def expression_is_plain(text: str) -> bool:
    """True when ``text`` can only build a sympy expression: no attribute access, subscripts, dunders,
    lambdas or free-form strings, and no calls except CamelCase expression classes and a few math
    functions (every Python builtin that could run code is lower case)."""
    if len(text) > _MAX_EXPR_CHARS or "__" in text:
        return False
    bare = _QUOTED.sub("0", text)                # quoted names/numbers: 's27', '0.5'
    if not _EXPR_CHARS.fullmatch(bare):
        return False
    if "." in _DECIMAL.sub("0", bare):           # a dot outside a number is attribute access
        return False
    if re.search(r"\)\s*\(", bare):              # calling the result of an expression
        return False
    if not all(name[0].isupper() or name in _EXPR_LOWER_CALLS for name in _CALLED_NAME.findall(bare)):
        return False
    return _cheap_to_evaluate(text)


# Evaluating a plain expression can still be a bomb: Integer(10)**Integer(10)**Integer(8) or
# Pow(Integer(10), Integer(10**18)) computes a number of 10^8.. digits, 'a'*10**10 allocates 10 GB,
# factorial(Integer(10**7)) runs for hours. Shape arithmetic needs none of that: sympy's srepr writes
# powers as Pow(base, small exponent), and sizes fit in 64 bits.
_MAX_INT = 1 << 63
_MAX_EXPONENT = 64
_MAX_FACTORIAL = 20
_AST_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not, ast.Invert,
            ast.And, ast.Or, ast.BitAnd, ast.BitOr, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def _literal_int(node) -> int | None:
    """The integer a node spells directly (5, -5, Integer(5), Integer(-5)), else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _literal_int(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" \
            and len(node.args) == 1 and not node.keywords:
        return _literal_int(node.args[0])
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    return None


def _cheap_to_evaluate(text: str) -> bool:
    """Parsed (never run) with Python's own parser: only names, numbers within 64 bits, quoted symbol
    names as call arguments, arithmetic without ``**``/shifts, Pow with a literal exponent of at most 64
    (not nested in another Pow's base) and factorial of at most 20."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    try:
        nodes = list(ast.walk(tree))
    except RecursionError:
        return False
    string_args = set()
    for node in nodes:
        if isinstance(node, ast.Call):
            string_args.update(id(a) for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
            string_args.update(id(k.value) for k in node.keywords)
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name == "Pow":
                exponent = _literal_int(node.args[1]) if len(node.args) == 2 else None
                if exponent is None or abs(exponent) > _MAX_EXPONENT:
                    return False
                # Pow(Pow(Pow(Integer(10), 64), 64), 64)...: each level multiplies the digits by 64
                if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Pow"
                       for n in ast.walk(node.args[0])):
                    return False
            if name == "factorial":
                value = _literal_int(node.args[0]) if len(node.args) == 1 else None
                if value is not None and value > _MAX_FACTORIAL:
                    return False
                if value is None and not (node.args and isinstance(node.args[0], (ast.Name, ast.Call))):
                    return False
    for node in nodes:
        if isinstance(node, (ast.Expression, ast.Call, ast.Name, ast.Load, ast.keyword, ast.BinOp, ast.UnaryOp,
                             ast.BoolOp, ast.Compare) + _AST_OPS):
            continue
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, str):
                if id(node) not in string_args:  # a string in arithmetic: 'a' * 10**10
                    return False
                continue
            if isinstance(value, int) and abs(value) <= _MAX_INT:
                continue
            if isinstance(value, float) and math.isfinite(value):
                continue
        return False  # **, <<, >>, subscripts, attributes, lambdas, huge or complex numbers, ...
    return True


def _allowed_functions() -> set:
    import torch

    funcs = {getattr(operator, n) for n in _OPERATOR_FUNCS if hasattr(operator, n)}
    funcs |= {getattr(math, n) for n in _MATH_FUNCS if hasattr(math, n)}
    funcs |= {getattr(torch, n) for n in _SYM_FUNCS if hasattr(torch, n)}
    return funcs


def target_refusal(target: str, allowed: set) -> str | None:
    """Resolve ``target`` the way torch's deserializer does; None when it is an operator the op policy
    allows (or one of the symbolic-arithmetic functions above), otherwise why it is refused."""
    import torch

    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", target, re.ASCII):
        return "is not a torch operator"
    parts = target.split(".")
    roots = {"torch": torch, "_operator": operator, "math": math}
    op_name_index = 3 if parts[:2] == ["torch", "ops"] else -1
    if parts[0] not in roots or any(p.startswith("__") and i != op_name_index for i, p in enumerate(parts)):
        return "is not a torch operator"  # dunders only as an operator's name (torch.ops.aten.__and__.Tensor)
    obj = roots[parts[0]]
    try:
        for name in parts[1:]:
            obj = getattr(obj, name)
    except (AttributeError, RuntimeError):
        return "is not a torch operator"
    if isinstance(obj, torch._ops.HigherOrderOperator):
        return higher_order_refusal(obj.name())
    if isinstance(obj, torch._ops.OpOverload):
        return operator_refusal(obj._schema.name)
    if isinstance(obj, torch._ops.OpOverloadPacket):
        return operator_refusal(obj._qualified_op_name)
    try:
        return None if obj in allowed else "is not a torch operator"
    except TypeError:  # unhashable
        return "is not a torch operator"


def _walk(value, visit) -> None:
    stack = [value]
    while stack:  # iterative: hostile JSON may nest deeper than the recursion limit
        item = stack.pop()
        if isinstance(item, dict):
            visit(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_archive(path: Path) -> None:
    """Raise SecurityError when the archive's graphs call anything but torch operators or carry
    expressions that are not plain arithmetic; InputError when it is not a readable archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(".json")]
            if any(i.file_size > _MAX_JSON_BYTES for i in members):
                raise InputError("holds an implausibly large JSON member", file=path,
                                 fix="re-save it with torch.export.save")
            docs = {i.filename: zf.read(i) for i in members}
    except InputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError) as exc:  # RuntimeError: encrypted member; NotImplementedError: compression
        raise InputError(f"not a readable torch.export archive ({type(exc).__name__}: {exc})", file=path,
                         fix="re-save it with torch.export.save, or check that the file was copied whole") from exc
    except Exception as exc:  # zlib.error and friends from a corrupted member
        raise InputError(f"corrupted archive member ({type(exc).__name__}: {exc})", file=path,
                         fix="check that the file was copied whole") from exc
    allowed = _allowed_functions()
    for name, raw in docs.items():
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise InputError(f"member is not valid JSON ({type(exc).__name__})", file=path, field=name,
                             fix="re-save it with torch.export.save") from exc

        def visit(node: dict, member=name) -> None:
            if isinstance(node.get("target"), str) and "inputs" in node and "outputs" in node:
                why = target_refusal(node["target"], allowed)
                if why:
                    raise SecurityError(f"a graph node calls {node['target'][:80]!r}, which {why}",
                                        file=path, field=f"{member}: node {str(node.get('name'))[:40]!r}",
                                        fix=TRUST_FIX)
            if "as_operator" in node and isinstance(node["as_operator"], str):
                why = target_refusal(node["as_operator"], allowed)
                if why:
                    raise SecurityError(f"an argument names {node['as_operator'][:80]!r}, which {why}",
                                        file=path, field=f"{member}: as_operator", fix=TRUST_FIX)
            if "as_custom_obj" in node:  # a torchbind object: its methods are native code of some library
                raise SecurityError("an argument is a custom C++ class object, whose methods run native code",
                                    file=path, field=f"{member}: as_custom_obj", fix=TRUST_FIX)
            expr = node.get("expr_str")
            if expr is not None and not (isinstance(expr, str) and expression_is_plain(expr)):
                raise SecurityError(f"symbolic expression {str(expr)[:80]!r} is not plain arithmetic and would be "
                                    f"evaluated as Python", file=path, field=f"{member}: expr_str", fix=TRUST_FIX)

        _walk(doc, visit)



@contextmanager
def weights_only_unpickling(enabled: bool = True):
    """Force every ``torch.load`` inside the block through torch's weights-only unpickler, including
    the ones torch.export calls with ``weights_only=False``. torch reads this variable on each load.
    Not thread-safe (process environment); frontends load models on one thread."""
    if not enabled:
        yield
        return
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set makes torch raise
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
