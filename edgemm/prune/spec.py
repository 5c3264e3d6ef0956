"""``--prune`` values: one ratio for every branch, or ratios per modality branch."""

from __future__ import annotations

import math
import re

from ..errors import InputError

ALL_BRANCHES = "*"
# Removing every channel of a group would delete the layer; above this the model is gone anyway.
MAX_RATIO = 0.9
_NAME = re.compile(r"^[A-Za-z_][\w-]*$")
_EXAMPLE = "--prune 0.3 or --prune vision=0.3,text=0.2"


def parse_prune_spec(text: str) -> dict[str, float]:
    """``"0.3"`` -> ``{"*": 0.3}``; ``"vision=0.3,text=0.2"`` -> ``{"vision": 0.3, "text": 0.2}``.

    A ratio is the fraction of each prunable group's channels (attention heads, MLP hidden channels,
    conv channels) to remove, in [0, 0.9].
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty pruning spec", field="--prune", fix=f"e.g. {_EXAMPLE}")
    text = text.strip()
    if "=" not in text and "," not in text:
        return {ALL_BRANCHES: _ratio(text, ALL_BRANCHES)}
    spec: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise InputError(f"cannot read {part!r}: expected BRANCH=RATIO", field="--prune", fix=f"e.g. {_EXAMPLE}")
        if name != ALL_BRANCHES and not _NAME.match(name):
            raise InputError(f"{name!r} is not a branch name", field="--prune",
                             fix="use branch names such as vision, text, audio, fusion (or * for all)")
        if name in spec:
            raise InputError(f"branch {name!r} is given twice", field="--prune", fix="name each branch once")
        spec[name] = _ratio(value.strip(), name)
    return spec


def _ratio(value: str, name: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise InputError(f"{value!r} is not a number (branch {name})", field="--prune",
                         fix=f"e.g. {_EXAMPLE}") from None
    if not math.isfinite(ratio) or not 0.0 <= ratio <= MAX_RATIO:
        raise InputError(f"ratio {value} for branch {name} is outside [0, {MAX_RATIO}]", field="--prune",
                         fix="give the fraction of channels to remove, e.g. 0.3")
    return ratio


def ratios_for(spec: dict[str, float], branches: list[str]) -> dict[str, float]:
    """Branch -> ratio for the branches found in the model; names in ``spec`` must exist there."""
    unknown = [name for name in spec if name != ALL_BRANCHES and name not in branches]
    if unknown:
        raise InputError(f"the model has no {unknown[0]!r} branch (found: {', '.join(branches) or 'none'})",
                         field="--prune", fix="name one of the branches found, or give one ratio for all")
    default = spec.get(ALL_BRANCHES, 0.0)
    return {branch: spec.get(branch, default) for branch in branches}
