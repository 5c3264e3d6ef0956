"""Whole numbers read from text that users or files wrote (flags, manifests, target profiles). Standard
library only (the runtime uses it).

Why not ``s.isdigit()`` then ``int(s)``: ``isdigit`` accepts characters ``int`` refuses (superscripts such as '²'), and ``int`` raises ValueError on any string longer than Python's 4300-digit limit. Both
turned forged input into internal errors; here only ASCII digits count, at most 18 of them."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]{1,18}")


def ascii_int(text) -> int | None:
    """``text`` as a non-negative int when it is 1 to 18 ASCII digits, else None."""
    text = str(text)
    return int(text) if _DIGITS.fullmatch(text) else None


def version_numbers(text, parts: int = 3) -> tuple[int, ...]:
    """"10.3.0" -> (10, 3, 0): the first ``parts`` dot-separated pieces, each the number its ASCII digits
    spell (0 when it has none; "10b2" reads 102, as TensorRT's own version strings never need)."""
    out = []
    for piece in str(text).split(".")[:parts]:
        digits = "".join(ch for ch in piece if "0" <= ch <= "9")[:18]
        out.append(int(digits) if digits else 0)
    return tuple(out)
