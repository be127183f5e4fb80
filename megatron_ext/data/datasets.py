"""GPT train/valid/test datasets over megatron-core's BlendedMegatronDatasetBuilder.

Sample order and data parallelism
---------------------------------
Build the datasets once for the *global* sample counts (``train_iters * global_batch_size`` and
so on), with the same arguments on every rank. Sample ``i`` of the returned dataset is then the
same on every rank and for any data-parallel size: the order depends only on the blend, split,
seq_length, seed and num_samples. Each rank takes its own slice of the global order in training
(``megatron_ext.training.batches.MicroBatches``): global step ``s`` always consumes samples
``[s * G, (s + 1) * G)`` for global batch size ``G``, whatever the number of ranks, so changing
the data-parallel size does not change what the model sees.

Samples are dicts of torch tensors of length ``seq_length``: ``tokens`` (int64), ``labels``
(int64, tokens shifted by one), ``loss_mask`` (float32), ``position_ids`` (int64); plus
``attention_mask`` (bool, [1, s, s]) only with ``create_attention_mask=True`` (off by default:
megatron's causal attention builds its own mask, and an s x s mask per sample is large), and
``dataset_id`` (which blend entry the sample came from) when the blend has two or more prefixes.

Distributed: the builder needs no torch.distributed. When it is initialized, call the build on
every rank (megatron builds on rank 0 first, then barriers); ``cache_dir`` must then be on a file
system all ranks see. Index caches are keyed on every input that changes the order.

Damage: every prefix goes through ``integrity.check_indexed_dataset`` (a one-line DataError naming
the file for a truncated, corrupt or mismatched .bin/.idx pair) before megatron opens it, and
damaged index caches are removed and rebuilt (``integrity.discard_damaged_caches``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_ext.data.errors import DataError
from megatron_ext.data.integrity import (
    FULL_SCAN_BYTES,
    check_indexed_dataset,
    discard_damaged_caches,
    token_range,
)
from megatron_ext.data.tokenizer import Tokenizer, load_tokenizer
from megatron_ext.platform.quiet import quiet_megatron

with quiet_megatron():  # its package import warns about optional GPU libraries
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset


def is_built_on_rank() -> bool:
    """Every rank builds (and holds) the datasets; each then reads only its own slice."""
    return True


class _SingleProcessSafeBuilder(BlendedMegatronDatasetBuilder):
    """Works around megatron-core 0.16.1 BlendedDataset calling torch.distributed.get_rank() on a
    cache miss even when torch.distributed is not initialized (GPTDataset checks, it does not).

    Without an initialized process group, the BlendedDataset is built without its on-disk cache
    (blending indices are cheap C++; the expensive GPTDataset indices are still cached).
    """

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):  # type: ignore
        quiet = contextlib.nullcontext()
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            *rest, config = args
            if config.path_to_cache:
                config = copy.copy(config)
                config.path_to_cache = None
                # Its "cannot save ... path_to_cache is None" warning would mislead here.
                quiet = _quiet("megatron.core.datasets.blended_dataset")
            args = (*rest, config)
        with quiet:
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args
            )


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence one megatron logger's warnings for a block (they state the expected there)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_blend(blend: Sequence[Any]) -> tuple[list[str], list[float] | None]:
    """``[w, prefix, w, prefix, ...]`` or ``[prefix, ...]`` -> (prefixes, weights or None)."""
    items = list(blend) if blend is not None else []
    if not items:
        raise DataError("data blend is empty")
    if len(items) % 2 == 0 and all(_is_number(w) for w in items[0::2]):
        weights = [float(w) for w in items[0::2]]
        prefixes = [str(p) for p in items[1::2]]
        if any(_is_number(p) for p in prefixes) or any(w <= 0 for w in weights):
            raise DataError(f"blend weights must be positive and alternate with paths: {items}")
    elif not any(_is_number(p) for p in items):
        prefixes, weights = [str(p) for p in items], None
    else:
        raise DataError(f"data blend must be [weight, prefix, ...] or [prefix, ...], got {items}")
    for prefix in prefixes:
        check_indexed_dataset(prefix)  # the one gate before anything opens the files
    return prefixes, weights


def token_counts(prefixes: Sequence[str]) -> list[int]:
    """Number of tokens stored under each prefix (read from the validated .idx files only)."""
    return [check_indexed_dataset(prefix).tokens for prefix in prefixes]


def max_token_id(prefixes: Sequence[str], full_scan_bytes: int = FULL_SCAN_BYTES) -> int:
    """Largest token id stored under the prefixes: every token of a .bin up to
    ``full_scan_bytes``, a sample of a larger one (``integrity.token_range``)."""
    return max(token_range(prefix, full_scan_bytes)[1] for prefix in prefixes)


def check_vocab(tokenizer_vocab: int, model_vocab: int, dataset_max_token: int | None,
                where: str = "dataset") -> None:
    """Raise DataError naming the mismatch if token ids cannot fit the model's embedding;
    ``where`` names the data in the message (e.g. the .bin file)."""
    if tokenizer_vocab > model_vocab:
        raise DataError(
            f"tokenizer vocab size {tokenizer_vocab} exceeds the model's padded vocab size "
            f"{model_vocab}; raise model.vocab_size (the model pads it to model.vocab_multiple)"
        )
    if dataset_max_token is None:
        return
    if dataset_max_token >= model_vocab:
        raise DataError(
            f"{where} contains token id {dataset_max_token} but the model's padded vocab size is "
            f"{model_vocab}"
        )
    if dataset_max_token >= tokenizer_vocab:
        raise DataError(
            f"{where} contains token id {dataset_max_token} but the tokenizer vocab size is "
            f"{tokenizer_vocab}: the data was tokenized with a different tokenizer"
        )


def _check_common(seq_length: int, num_samples: Sequence[int]) -> list[int]:
    if seq_length <= 0:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    sizes = list(num_samples)
    if len(sizes) != 3 or any(int(n) != n or n < 0 for n in sizes):
        raise DataError(f"num_samples must be 3 non-negative ints (train, valid, test): {sizes}")
    return [int(n) for n in sizes]


def _config(seed: int, seq_length: int, tokenizer: Any, **kwargs: Any) -> GPTDatasetConfig:
    options = dict(
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,
    )
    options.update(kwargs)
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer, **options
    )


def build_gpt_datasets(
    blend: Sequence[Any],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    tokenizer: Tokenizer | str,
    cache_dir: str | None,
    *,
    model_vocab_size: int | None = None,
    scan_max_token: bool = False,
    **gpt_options: Any,
) -> tuple[Any, Any, Any]:
    """Build (train, valid, test) GPT datasets; a split with weight 0 in ``split`` is None.

    ``blend`` is ``[w1, prefix1, w2, prefix2, ...]`` or ``[prefix1, prefix2, ...]``. Without
    weights, prefixes are weighted by their token counts (the proportion megatron infers from
    dataset lengths), passed to megatron as explicit weights so that ``num_samples`` is honoured
    even beyond one epoch. ``split`` is megatron's "train,valid,test" ratio string, e.g. "98,2,0".
    ``cache_dir`` holds the index caches (None: megatron's default, ``PREFIX/cache/`` next to each
    prefix). With ``model_vocab_size`` the vocabularies are checked (``check_vocab``), scanning the
    data for its largest id when ``scan_max_token`` (every token of a .bin up to 2 GiB, 64 windows
    of a larger one). Every prefix is validated (``integrity.check_indexed_dataset``) and damaged
    index caches are removed (``integrity.discard_damaged_caches``) before megatron opens
    anything. ``gpt_options`` go to GPTDatasetConfig
    (``eod_mask_loss``, ``reset_position_ids``, ``reset_attention_mask``,
    ``create_attention_mask``).
    """
    sizes = _check_common(seq_length, num_samples)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    prefixes, weights = parse_blend(blend)
    if model_vocab_size is not None:
        check_vocab(tokenizer.vocab_size, model_vocab_size, None)
        for prefix in prefixes if scan_max_token else ():
            check_vocab(tokenizer.vocab_size, model_vocab_size, token_range(prefix)[1],
                        where=f"{prefix}.bin")
    ratios = re.findall(r"[.0-9]+", split or "")  # the numbers megatron's parser would read
    try:
        valid_split = 1 <= len(ratios) <= 3 and sum(float(r) for r in ratios) > 0
    except ValueError:
        valid_split = False
    if not valid_split:
        raise DataError(f"bad split {split!r}: expected up to 3 ratios, e.g. '98,2,0'")
    if len(prefixes) > 1 and weights is None:
        weights = [float(n) for n in token_counts(prefixes)]
    if len(prefixes) == 1:
        weights = None  # a one-entry blend is the plain GPTDataset, no BlendedDataset wrapper
    config = _config(
        seed, seq_length, tokenizer, blend=(prefixes, weights), split=split,
        path_to_cache=cache_dir, **gpt_options,
    )
    # megatron's default cache is PREFIX/cache/GPTDataset_indices (no blend cache without a dir).
    discard_damaged_caches([cache_dir] if cache_dir else
                           [os.path.join(p, "cache", "GPTDataset_indices") for p in prefixes])
    builder = _SingleProcessSafeBuilder(GPTDataset, sizes, is_built_on_rank, config)
    train, valid, test = builder.build()
    return train, valid, test


@dataclass
class _MockTokenizer:
    """The two attributes MockGPTDataset needs, plus what megatron's cache hashing reads."""

    vocab_size: int
    eod: int = 0
    unique_identifiers: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unique_identifiers = {"class": "mock", "vocab_size": self.vocab_size, "eod": self.eod}


def build_mock_datasets(
    seq_length: int, seed: int, num_samples: tuple[int, int, int], vocab_size: int,
    split: str = "98,2,0",
) -> tuple[Any, Any, Any]:
    """Synthetic (train, valid, test) datasets from megatron's MockGPTDataset (``data.mock``).

    Same sample dict as ``build_gpt_datasets``; nothing is read or written on disk.
    """
    sizes = _check_common(seq_length, num_samples)
    if vocab_size < 2:
        raise DataError(f"mock vocab_size must be at least 2, got {vocab_size}")
    config = _config(seed, seq_length, _MockTokenizer(vocab_size), split=split)
    builder = _SingleProcessSafeBuilder(MockGPTDataset, sizes, is_built_on_rank, config)
    with _quiet("megatron.core.datasets.gpt_dataset"):  # mock data has no index cache by design
        train, valid, test = builder.build()
    return train, valid, test

