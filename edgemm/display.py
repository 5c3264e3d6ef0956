"""Showing names that come from input files (tensor names, bundle names, manifest strings) safely.

A model or a manifest may name an output "logits\\n\\x1b[32mPASS": printed raw, it would forge lines of
edgemm's own output or drive the terminal; written raw into JUnit XML it makes the file invalid (XML 1.0
forbids most control characters, even escaped); into Markdown, ``<img src=...>`` or ``|`` would become
markup in a pull-request comment. Standard library only (the runtime's commands use it)."""

from __future__ import annotations

import html
import re

# C0/C1 controls, DEL, line/paragraph separators and bidirectional overrides (which reorder what is shown)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# What XML 1.0 allows in a document at all (tab, newline and carriage return are the only controls).
_XML_ILLEGAL = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` on one line with every control or reordering character written as an escape (\\x1b)."""
    return _CONTROL.sub(_escape, str(text))


def xml_text(text: object) -> str:
    """``text`` with the characters XML 1.0 cannot hold written as escapes; ElementTree escapes the rest."""
    return _XML_ILLEGAL.sub(_escape, str(text))


def md_text(text: object) -> str:
    """``text`` for a Markdown line or table cell: printable, HTML-escaped (no raw tags), and without the
    characters that end a table cell or open code spans."""
    escaped = html.escape(printable(text), quote=False)
    return escaped.replace("|", "\\|").replace("`", "\\`")


def md_code(text: object) -> str:
    """``text`` inside a Markdown code span (`...`), where HTML is shown as text: printable, and no
    backtick that would close the span early."""
    return printable(text).replace("`", "'")
