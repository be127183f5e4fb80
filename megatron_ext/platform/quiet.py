"""The one list of warnings we hide, and the two ways to hide them.

megatron-core warns at import time that Transformer Engine and Apex are absent (our ``backends:``
log line says what runs instead), and megatron-core 0.16.1 / torch emit internal deprecation
notices a user cannot act on. Hidden so that a bad input is reported in exactly one stderr line
and a training log shows what matters.

* ``quiet_megatron()``: a context manager around an import or call of megatron-core, for library
  modules (the filters end with the block; nothing process-wide changes);
* ``quiet_process()``: process-wide filters for entry points (``megatron_ext.cli``), set
  before megatron-core is imported.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# megatron-core: "Transformer Engine is not installed", "Transformer Engine and Apex are not
# installed. Falling back to Torch optimizers.", ...
OPTIONAL_BACKENDS = r".*(Transformer Engine|Apex).*not installed"
# Internal deprecations inside megatron-core 0.16.1 / torch (message prefixes, as
# ``warnings.filterwarnings`` matches them).
INTERNAL_NOTICES = (
    "full scope is deprecated",       # megatron TransformerConfig
    "moe_ffn_hidden_size is not set",  # megatron TransformerConfig: we set ffn_hidden_size
    "Please use DTensor instead",     # torch ShardedTensor, used by dist_checkpointing
    ".*`load_state_dict` is deprecated",  # torch.distributed.checkpoint, used by megatron
    "The legacy GroupedMLP",          # megatron's spec without TE; our grouped experts replace it
)
# Every warning raised from these modules: for tools whose stderr must be exactly one line.
INTERNAL_MODULES = (r"megatron\.", r"torch\.distributed\.checkpoint")


def _hide_notices() -> None:
    warnings.filterwarnings("ignore", message=OPTIONAL_BACKENDS)
    for message in INTERNAL_NOTICES:
        warnings.filterwarnings("ignore", message=message)


@contextmanager
def quiet_megatron() -> Iterator[None]:
    """Hide the optional-backend notices and the internal deprecations for the block."""
    with warnings.catch_warnings():
        _hide_notices()
        yield


def quiet_process(all_from_internals: bool = False) -> None:
    """Hide the optional-backend notices and the internal deprecations for the whole process;
    ``all_from_internals``: also every other warning raised inside megatron-core and torch's
    distributed checkpointing (converters and analysis tools)."""
    _hide_notices()
    if all_from_internals:
        for module in INTERNAL_MODULES:
            warnings.filterwarnings("ignore", module=module)
