"""Run the real ``pretrain_moe.py`` with every torch.distributed collective counted (forked
from one driver by tests/distributed/test_comm_volumes.py, or launched by torchrun).

Each collective call of the ``COUNTED_STEP``-th optimizer step adds its message bytes (the
tensor the caller hands over: all-gather output, reduce-scatter input, all-reduce buffer,
all-to-all input, point-to-point tensor) to ``(kind, ranks of its group)``; every rank writes
its tally to ``$COMM_COUNT_DIR/rank<r>.json`` at exit. gloo's all_to_all_single takes split
sizes only as Python ints, so they are converted before the original call (megatron's alltoall
dispatcher passes numpy integers); the bytes moved are unchanged.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

COUNTED_STEP = 2  # the first step builds buffers lazily; the second is a steady one
_step = [0]
_inside = [0]
_tally: dict[tuple[str, tuple[int, ...]], float] = defaultdict(float)


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size()


def _ranks(group) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group or dist.group.WORLD))


# kind -> (which argument is the message, how its bytes are counted)
MESSAGE_ARG = {
    "all_reduce": 0, "reduce_scatter_tensor": 1, "all_gather_into_tensor": 0,
    "all_gather": 0, "reduce_scatter": 1, "all_to_all_single": 1, "broadcast": 0,
    "send": 0, "recv": 0, "isend": 0, "irecv": 0,
}


def _wrap(name: str):
    orig = getattr(dist, name)

    @functools.wraps(orig)
    def counted(*args, **kwargs):
        if name == "all_to_all_single":
            args, kwargs = _int_splits(args, kwargs)
        if name == "all_gather" and not _inside[0] and _uneven(args[0]):
            return _padded_all_gather(counted, *args, **kwargs)
        if _step[0] == COUNTED_STEP and not _inside[0]:
            msg = args[MESSAGE_ARG[name]] if len(args) > MESSAGE_ARG[name] else None
            msg = msg if msg is not None else kwargs.get("tensor", kwargs.get("input"))
            group = kwargs.get("group")
            if group is None and name in ("all_reduce", "broadcast") and len(args) > 2:
                group = args[2]
            elif group is None and name not in ("send", "recv", "isend", "irecv"):
                group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            p2p = {"send": "send", "isend": "send", "recv": "recv", "irecv": "recv"}
            key = (p2p[name], ()) if name in p2p else (name, _ranks(group))
            _tally[key] += _nbytes(msg)
        # The CPU platform's TorchFunctionMode re-dispatches the call to the public function,
        # which is this wrapper again: count the outermost call only.
        _inside[0] += 1
        try:
            return orig(*args, **kwargs)
        finally:
            _inside[0] -= 1

    return counted


def _uneven(tensor_list) -> bool:
    return len({tuple(t.shape) for t in tensor_list}) > 1


def _padded_all_gather(gather, tensor_list, tensor, group=None, async_op=False):
    """gloo gathers equal shapes only: pad every rank's rows to the longest, gather, trim. The
    message counted is the caller's (``tensor_list``), as NCCL would move it."""
    if _step[0] == COUNTED_STEP:
        _tally[("all_gather", _ranks(group))] += _nbytes(tensor_list)
    rows = max(t.shape[0] for t in tensor_list)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    buffers = [padded.new_empty(padded.shape) for _ in tensor_list]
    _inside[0] += 1  # not counted again
    try:
        gather(buffers, padded, group=group)
    finally:
        _inside[0] -= 1
    for out, buf in zip(tensor_list, buffers):
        out.copy_(buf[: out.shape[0]])
    assert not async_op, "megatron's dispatcher gathers synchronously"


def _int_splits(args, kwargs):
    args = list(args)
    for i in (2, 3):
        if len(args) > i and args[i] is not None:
            args[i] = [int(x) for x in args[i]]
    for key in ("output_split_sizes", "input_split_sizes"):
        if kwargs.get(key) is not None:
            kwargs[key] = [int(x) for x in kwargs[key]]
    return tuple(args), kwargs


def _wrap_batch_p2p():
    orig = dist.batch_isend_irecv

    @functools.wraps(orig)
    def counted(p2p_ops):
        if _step[0] == COUNTED_STEP and not _inside[0]:
            for op in p2p_ops:
                kind = "send" if op.op in (dist.isend, dist.send) else "recv"
                _tally[(kind, ())] += _nbytes(op.tensor)
        return orig(p2p_ops)

    return counted


def install() -> None:
    """Wrap the collectives, also where megatron bound them at import (param_and_grad_buffer's
    ``dist_all_gather_func``...): forked from tests.forkrun's driver, it is imported already."""
    wrapped = {id(getattr(dist, name)): _wrap(name) for name in MESSAGE_ARG}
    wrapped[id(dist.batch_isend_irecv)] = _wrap_batch_p2p()
    for module in [dist, dist.distributed_c10d] + [
            m for name, m in list(sys.modules.items()) if name.startswith("megatron")]:
        for attr, value in list(vars(module).items()):
            if id(value) in wrapped:
                setattr(module, attr, wrapped[id(value)])

    import megatron_ext.training.session  # noqa: F401 (first: the package's import order)
    from megatron_ext.training.trainer import Trainer

    orig_step = Trainer._step

    def step(self):
        _step[0] += 1
        return orig_step(self)

    Trainer._step = step
    atexit.register(_write)


def _write() -> None:
    out = Path(os.environ["COMM_COUNT_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
    rows = [{"kind": k, "ranks": list(r), "bytes": b} for (k, r), b in sorted(_tally.items())]
    out.write_text(json.dumps(rows))


if __name__ == "__main__":
    install()
    torch.set_num_threads(1)
    from megatron_ext.training.cli import main

    sys.exit(main(sys.argv[1:]))
