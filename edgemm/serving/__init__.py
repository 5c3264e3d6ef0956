"""Serving bundles at scale: Triton Inference Server model repositories (config.pbtxt per bundle, the
bundle copied whole and hash-checked), and a local Triton server for trying them out."""
