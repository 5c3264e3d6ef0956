"""Kept for code written against edgemm before #15 (every caller in this repository imports
``edgemm.pipeline``; a test keeps it so): the compile pipeline lives in ``edgemm/pipeline/`` (stages over
one ``Compilation``; see docs/architecture.md). To be dropped once no caller outside needs it."""

from __future__ import annotations

from .pipeline import CompileResult, compile_model
from .pipeline.inputs import (DEFAULT_MAX_BATCH, default_name, resolve_input_specs, sample_feeds, synth_feeds,
                              timing_batches)
from .pipeline.sidecar import EXAMPLE_SIDECAR

__all__ = ["compile_model", "CompileResult", "DEFAULT_MAX_BATCH", "EXAMPLE_SIDECAR", "default_name",
           "resolve_input_specs", "sample_feeds", "synth_feeds", "timing_batches"]
