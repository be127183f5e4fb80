"""Write megatron-core's indexed dataset (``.bin`` + ``.idx``) a chunk of documents at a time.

megatron-core's ``IndexedDatasetBuilder`` takes one ``add_document`` call per document and its
``finalize`` computes the sequence pointers in a Python loop over numpy scalars: on short
documents these were ~9% and ~5% of all the CPU time of preprocessing, serial work in the main
process that capped how far worker processes could scale. ``ChunkWriter`` writes a chunk's tokens
with one ``write`` and keeps the documents' lengths as arrays; the index is written by
megatron-core's own ``_IndexWriter`` (the format stays megatron's) with the pointers computed by a
cumulative sum. Every document is one sequence, as ``add_document(tokens, [len(tokens)])``
makes it; the output is byte-identical to that (tests/unit/test_data_preprocess.py compares).
Imports megatron-core: import this module where the import time is already paid.
"""

from __future__ import annotations

import numpy as np

from megatron_ext.platform.quiet import quiet_megatron

with quiet_megatron():  # its package import warns about optional GPU libraries
    from megatron.core.datasets import indexed_dataset
    from megatron.core.datasets.indexed_dataset import DType


class _IndexWriter(indexed_dataset._IndexWriter):
    """megatron-core's index writer with vectorized sequence pointers (patches.py:
    chunked-index-writes)."""

    def _sequence_pointers(self, sequence_lengths: np.ndarray) -> np.ndarray:
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * DType.size(self.dtype), out=pointers[1:])
        return pointers


class ChunkWriter:
    """``add_documents`` many documents at once into ``bin_path``; ``finalize`` writes the
    index; ``close`` (idempotent) only closes the data file, for error paths."""

    def __init__(self, bin_path: str, dtype: type[np.number]) -> None:
        self.dtype = dtype
        self.data_file = open(bin_path, "wb")  # noqa: SIM115 (closed by finalize or close)
        self.lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` all of them back to back, ``lengths`` one per document."""
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.lengths.append(np.asarray(lengths, dtype=np.int64))

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        documents = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        with _IndexWriter(idx_path, self.dtype) as writer:
            writer.write(lengths, None, documents)

    def close(self) -> None:
        self.data_file.close()
