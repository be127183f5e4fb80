"""Mean and std of any set of a matrix's neurons, from sums taken once per neuron.

Drop-Upcycling re-initializes, per expert and projection, a random half of the dense matrix's
neurons with the mean and std of exactly those neurons (REFERENCE.md section 1). The sets differ
per expert, but they are all made of the same dense neurons: summing each neuron once per layer
(one pass over the matrix) makes every set's statistics an O(k) sum instead of a pass over
k x H values per expert and projection (a Welford ``torch.std_mean`` of the gathered slice, the
upcycler's largest cost before). The streaming check judges the dropped neurons with the same
sums.

Precision: per-neuron sums in fp64, shifted by a reference value near the matrix's mean (so a
mean far from 0 does not cancel the variance away), added over a set with ``math.fsum`` (exact:
the order of the set does not matter). The fp32 statistics the sampler takes are the fp64 ones
rounded once, as ``torch.std_mean`` rounds its fp64 Welford accumulators once: the two agree
unless the exact value lies within fp64 rounding error of an fp32 rounding boundary (both are
then off by one fp32 ulp at most; Welford's own result there depends on the thread count, which
splits its sum). ``tests/unit/test_upcycling_neuron_stats.py`` replays the Welford algorithm.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

from megatron_ext.platform.direct_io import ALIGN

_CHUNK = 256  # neurons per fp64 temporary: 256 x H x 8 bytes (6 MB at H = 3072)


def as_fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32, as a Python float."""
    return torch.tensor(x, dtype=torch.float32).item()


class NeuronSums:
    """Per-neuron sum and sum of squares of ``w - shift`` in fp64; neurons are the rows of ``w``
    (``neuron_dim`` 0: gate/up [F, H]) or its columns (``neuron_dim`` 1: down [H, F])."""

    def __init__(self, w: Tensor, neuron_dim: int) -> None:
        neurons = w.shape[neuron_dim]
        self.width = w.shape[1 - neuron_dim]
        # Any fixed value near the mean removes the cancellation; one neuron's mean is cheap and
        # the same on every machine (one neuron is below torch's parallel grain).
        self.shift = w.select(neuron_dim, 0).double().mean().item() if w.numel() else 0.0
        self.s1 = torch.empty(neurons, dtype=torch.float64)
        self.s2 = torch.empty(neurons, dtype=torch.float64)
        # One fp64 block, refilled: a fresh 6 MB temporary per block cost 4x the arithmetic in
        # page faults (88 ms vs 19 ms for an 8192 x 3072 bf16 matrix, measured). Filled by copy_,
        # so an fp64 ``w`` is never changed (``.double()`` would be ``w`` itself).
        block = torch.empty(min(_CHUNK, neurons) * self.width, dtype=torch.float64)
        for start in range(0, neurons, _CHUNK):
            stop = min(start + _CHUNK, neurons)
            # a block of whole neurons, read in w's own memory order (down: a column block)
            src = w.narrow(neuron_dim, start, stop - start)
            x = block[:src.numel()].view(src.shape).copy_(src)
            x -= self.shift
            torch.sum(x, dim=1 - neuron_dim, out=self.s1[start:stop])
            torch.sum(x.square_(), dim=1 - neuron_dim, out=self.s2[start:stop])

    def std_mean(self, neurons: Tensor) -> tuple[float, float]:
        """Unbiased std and mean (fp64) of all weights of ``neurons`` (indices, no repeats)."""
        n = neurons.numel() * self.width
        s1 = math.fsum(self.s1[neurons].tolist())
        if n < 2:
            return 0.0, self.shift + s1
        s2 = math.fsum(self.s2[neurons].tolist())
        var = (s2 - s1 * s1 / n) / (n - 1)
        return math.sqrt(max(var, 0.0)), self.shift + s1 / n


class Scratch:
    """Reused temporaries (samples, gathered slices): a fresh 50 MB tensor per slice costs more in
    page faults than ``normal_`` costs filling it. A buffer is valid until the next ``get`` of
    its dtype; use one ``Scratch`` per thread."""

    def __init__(self) -> None:
        self._flat: dict[torch.dtype, Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        n = math.prod(shape)
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < n:
            flat = self._flat[dtype] = torch.empty(n, dtype=dtype)
        return flat[:n].view(shape)


def page_aligned(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An empty tensor whose data starts on a page: the writer then sends its whole blocks to
    an O_DIRECT file from where they are (``platform.direct_io``), not through a copy. torch
    aligns large tensors to 64 bytes (to a page only with THP_MEM_ALLOC_ENABLE)."""
    n = math.prod(shape) * dtype.itemsize
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % ALIGN  # a multiple of 64: of any element size
    # set_, not a view: a view keeps ``raw`` as its base, a second use of the memory that
    # ``Recycler`` would read as a consumer still holding it
    return torch.empty(0, dtype=dtype).set_(raw.untyped_storage(), skip // dtype.itemsize, shape)


class Recycler:
    """Tensors handed to consumers (a writer, a check, the caller) and reused once all of them
    have let go: a fresh 50 MB tensor costs a page fault and a zeroed page per 2 MB (4 KB
    without huge pages) on every use, a reused one nothing.

    "Let go" is read from reference counts, both of which CPython and torch keep exactly: no
    other Python reference to the tensor object, and no other tensor (a view, a numpy array)
    sharing its memory. A tensor that is still held is never handed out again; at most ``keep``
    tensors are kept (beyond that, fresh ones). All start on a page (``page_aligned``)."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._kept: list[Tensor] = []

    def get(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
        shape = tuple(shape)
        for i in range(len(self._kept)):
            if self._reusable(i, shape, dtype):
                return self._kept[i]
        t = page_aligned(shape, dtype)
        if len(self._kept) < self.keep:
            self._kept.append(t)
        return t

    def _reusable(self, i: int, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        t = self._kept[i]
        if t.dtype != dtype or tuple(t.shape) != shape:
            return False
        del t
        # Python references: the list's and getrefcount's argument. Uses of the memory: the
        # tensor's and the temporary storage object's.
        return (sys.getrefcount(self._kept[i]) == 2
                and torch._C._storage_Use_Count(self._kept[i].untyped_storage()._cdata) == 2)
