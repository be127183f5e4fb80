"""Process groups and the parallel layout, from torchrun or SLURM environment variables."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_ext.config.schema import Config
from megatron_ext.platform import cpu
from megatron_ext.platform.compat import apply_megatron_fixes
from megatron_ext.platform.launch import free_port, launch


@dataclass
class Layout:
    rank: int
    world_size: int
    local_rank: int
    tensor: int
    pipeline: int
    expert: int
    data: int
    device: torch.device
    backend: str
    virtual_pipeline: int | None = None  # model chunks per pipeline stage (interleaved)

    def describe(self) -> str:
        vpp = f" vpp={self.virtual_pipeline}" if self.virtual_pipeline else ""
        return (f"world={self.world_size} tp={self.tensor} pp={self.pipeline}{vpp} "
                f"ep={self.expert} dp={self.data} backend={self.backend} device={self.device.type}")


def environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun, else SLURM's srun, else a single process."""
    found = launch()
    return found.rank, found.world_size, found.local_rank


def init_distributed(cfg: Config, timeout_minutes: int = 30, standalone: bool = False) -> Layout:
    """Create the default process group and megatron's TP/PP/EP/DP groups; seed the RNGs.

    ``standalone``: a private one-process group (in-memory store), whatever the launcher's
    environment says -- for tools that inspect a model inside a multi-process job or dry run.
    """
    rank, world, local = (0, 1, 0) if standalone else environment()
    apply_megatron_fixes()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        cpu.enable()
        device, backend = torch.device("cpu"), "gloo"
        if cfg.train.deterministic:
            # Fixed intra-op threads make CPU float reductions reproducible run to run.
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A single process needs no agreed port: take a free one so concurrent runs don't clash.
        os.environ["MASTER_PORT"] = str(free_port()) if world == 1 else "29500"
    if not dist.is_initialized():
        store = dist.HashStore() if standalone else None
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, store=store,
            timeout=timedelta(minutes=timeout_minutes),
        )
    par = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        # A second model in one process (evaluating two checkpoints, a tool after a run): its
        # layout replaces the first one's instead of tripping megatron's "already initialized".
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        # None unless interleaved: megatron's "is first/last stage" then asks for a chunk.
        virtual_pipeline_model_parallel_size=virtual_pipeline(cfg),
        expert_model_parallel_size=par.expert,
    )
    seed_everything(cfg.train.seed)
    return Layout(rank, world, local, par.tensor, par.pipeline, par.expert,
                  parallel_state.get_data_parallel_world_size(), device, backend,
                  virtual_pipeline(cfg))


def virtual_pipeline(cfg: Config) -> int | None:
    """Model chunks per pipeline stage as megatron takes it: None when not interleaved."""
    vpp = cfg.parallel.virtual_pipeline
    return vpp if cfg.parallel.pipeline > 1 and vpp is not None and vpp > 1 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # megatron's tracker gives TP/EP ranks their own streams for partitioned weights.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
