"""Evaluation of our checkpoints: text generation and downstream tasks through
lm-evaluation-harness (a layer above checkpoint; training's in-loop evaluation uses it)."""
