"""Global-batch -> micro-batch slicing that does not depend on the data-parallel size.

Step ``t`` consumes the samples ``[c, c + G)`` of the dataset's global order (``c`` = samples
consumed so far, ``G`` = global batch). Micro-batch ``j`` of data-parallel rank ``r`` is the
contiguous slice starting at ``c + (j * dp + r) * mbs``. The set of sequences that make one
optimizer step is therefore the same for any layout, and resuming only needs ``c``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["loss_mask"] = out["loss_mask"].float()
    out["position_ids"] = out["position_ids"].long()
    return out


class MicroBatches:
    """Yields this rank's micro-batches for one optimizer step."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_size: int, dp_rank: int,
                 device: torch.device):
        if global_batch % (micro_batch * dp_size):
            raise ValueError("global batch not divisible by micro_batch * dp")
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.device = device
        self.num_microbatches = global_batch // (micro_batch * dp_size)

    def step(self, consumed: int) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.dataset)
        for j in range(self.num_microbatches):
            start = consumed + (j * self.dp_size + self.dp_rank) * self.micro_batch
            # Wrap around only if a run outlives its dataset (the builder sizes it to the run).
            samples = [self.dataset[(start + i) % n] for i in range(self.micro_batch)]
            batch = _collate(samples)
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
