"""The tokenizer a checkpoint was trained with, for the evaluation tools and the HF export.

``checkpoint_tokenizer(cfg)``: ``--tokenizer`` if the user gave one, else the checkpoint config's
``data.tokenizer``, else the demo tokenizer when the run trained on ``data.demo_corpus`` (built
from the shipped corpus exactly as training built it, cached). A tokenizer whose vocabulary does
not fit the model's (``model.vocab_size``) is refused: it was not the one the model learned.
"""

from __future__ import annotations

from megatron_ext.config.schema import Config
from megatron_ext.data.demo import ensure_demo_data
from megatron_ext.data.errors import DataError
from megatron_ext.data.tokenizer import Tokenizer, load_tokenizer


def tokenizer_path(cfg: Config, override: str | None = None) -> str:
    """Where the checkpoint's tokenizer is (see the module docstring)."""
    if override:
        return override
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.data.demo_corpus:
        return ensure_demo_data()[0]
    raise DataError("the checkpoint's config names no tokenizer (data.tokenizer); pass "
                    "--tokenizer")


def checkpoint_tokenizer(cfg: Config, override: str | None = None) -> Tokenizer:
    """Load the checkpoint's tokenizer and check that its ids fit the model's vocabulary."""
    path = tokenizer_path(cfg, override)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer {path} has {tokenizer.vocab_size} tokens, more than the "
                        f"model's vocabulary (model.vocab_size {cfg.model.vocab_size}): "
                        "not the tokenizer this model was trained with")
    return tokenizer
