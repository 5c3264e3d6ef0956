"""Moved: the baseline gate is the package edgemm.parity.gate (tolerances, context, anchor, golden,
compare, run, markdown). This name re-exports it until the branches still importing it have moved
(its ``write_reports`` is ``gate.write_gate_reports``: verify.write_reports is the verify one)."""

from .gate import *  # noqa: F401,F403
from .gate import __all__  # noqa: F401
