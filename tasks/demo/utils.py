"""Dataset loader of the local demo tasks: the shipped JSONL files, found next to this file.

lm-eval resolves a YAML's ``data_files`` against the current directory; loading them here, by
the path of this module, makes the tasks run from any directory and with no network.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_local(data_files: dict[str, str], **metadata) -> datasets.DatasetDict:
    """``data_files``: split -> path relative to this directory (``metadata``: unused)."""
    files = {split: str(HERE / path) for split, path in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
