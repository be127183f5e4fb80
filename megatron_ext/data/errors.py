"""The one exception type of the data pipeline.

Every user-facing data problem (missing file, bad tokenizer, malformed input under --strict,
vocabulary mismatch) raises ``DataError`` with a one-line message; the shared CLI runner
(``megatron_ext.platform.cli.run_cli``) turns it into exactly one line on stderr and exit 2, so
scripts and SLURM logs show the cause, not a traceback.
"""

from __future__ import annotations

from megatron_ext.errors import UserError


class DataError(UserError, ValueError):
    """A problem with user-provided data, paths or settings; the message is one line."""
