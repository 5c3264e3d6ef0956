"""Kept while callers move: the compile pipeline lives in ``edgemm/pipeline/`` (stages over one
``Compilation``; see docs/architecture.md). New code imports from there."""

from __future__ import annotations

from .pipeline import CompileResult, compile_model
from .pipeline.inputs import (DEFAULT_MAX_BATCH, default_name, resolve_input_specs, sample_feeds, synth_feeds,
                              timing_batches)
from .pipeline.sidecar import EXAMPLE_SIDECAR

__all__ = ["compile_model", "CompileResult", "DEFAULT_MAX_BATCH", "EXAMPLE_SIDECAR", "default_name",
           "resolve_input_specs", "sample_feeds", "synth_feeds", "timing_batches"]
