"""What the launcher says about this process, and a free port: standard library only.

``training/signals.py`` reads the rank before torch is imported (a signal can arrive before any
process group exists), so this module must stay light: no torch, no megatron, no YAML.

One reader of the launch environment: torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``,
else SLURM srun's ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``, else one process
(rank 0 of 1). torchrun's names win where both are set (torchrun inside an sbatch allocation).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_ext.errors import UserError

# (torchrun's name, srun's name) per field, in the order they are looked up.
_RANK = ("RANK", "SLURM_PROCID")
_WORLD = ("WORLD_SIZE", "SLURM_NTASKS")
_LOCAL = ("LOCAL_RANK", "SLURM_LOCALID")


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int


def _read(env: Mapping[str, str], names: tuple[str, ...], default: int, minimum: int) -> int:
    """The first of ``names`` set in ``env`` as an integer >= ``minimum``; ``default`` if none."""
    for name in names:
        if name in env:
            text = env[name].strip()
            if not (text.isdigit() and int(text) >= minimum):
                what = "process count" if minimum else "rank"
                adjective = "positive" if minimum else "non-negative"
                raise UserError(f"environment {name}: {env[name]!r} is not a {adjective} {what}")
            return int(text)
    return default


def launch(env: Mapping[str, str] | None = None) -> Launch:
    """Rank, world size and local rank of this process (``env``: os.environ by default)."""
    env = os.environ if env is None else env
    return Launch(rank=_read(env, _RANK, 0, 0), world_size=_read(env, _WORLD, 1, 1),
                  local_rank=_read(env, _LOCAL, 0, 0))


def world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes of the current launch (torchrun / srun), 1 for a plain ``python`` run."""
    return launch(env).world_size


def is_rank0(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process speaks for the job (prints the one error line, holds the locks)."""
    env = os.environ if env is None else env
    return _read(env, _RANK, 0, 0) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
