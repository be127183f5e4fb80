"""Data pipeline: tokenizers, preprocessing to megatron indexed datasets, GPT dataset building.

Submodules are imported on use; none of them imports megatron-core at import time except
``datasets`` (preprocessing imports it lazily), so CLIs fail fast on bad arguments.
"""
