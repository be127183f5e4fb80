"""A conversion's world of one (``conversion.mcore_io.single_process``) leaves the caller's
environment as it found it: the free MASTER_PORT it picks must not reach a job or tool started
later from the same process (a SLURM job inherited one and failed with EADDRINUSE)."""

from __future__ import annotations

import os

import torch.distributed as dist

from megatron_ext.config.schema import Config
from megatron_ext.conversion.mcore_io import single_process


def test_world_of_one_restores_master_addr_and_port(monkeypatch) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with single_process(Config()):
        assert dist.is_initialized() and os.environ.get("MASTER_PORT")  # it picked one
    assert not dist.is_initialized()
    assert "MASTER_PORT" not in os.environ and os.environ["MASTER_ADDR"] == "127.0.0.1"
