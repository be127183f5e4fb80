"""Build everything a run needs, in order: model, DDP wrapper, optimizer, schedule, data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from torch.utils.data import Dataset

from megatron_ext.config.derived import DEMO_PREFIX, Derived
from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config
from megatron_ext.data import datasets as D
from megatron_ext.data.demo import ensure_demo_data
from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.model.builder import Backends, build_model_chunks, resolve_backends
from megatron_ext.model.chunks import as_model
from megatron_ext.platform.dist import Layout
from megatron_ext.training.optim import build_optimizer, build_scheduler


@dataclass
class Run:
    """Everything a training run is made of, built by ``build_run``."""

    cfg: Config
    derived: Derived  # what cfg implies (total steps, MoE layers, ...), computed once
    layout: Layout
    backends: Backends
    # DDP(Float16Module (bf16 only)(GPTModel)): this rank's model or pipeline stage; with an
    # interleaved pipeline a ModelChunks of them (megatron_ext.model.chunks.model_chunks).
    model: torch.nn.Module
    optimizer: MegatronOptimizer  # a ChainedOptimizer (dense + expert parameters)
    scheduler: OptimizerParamScheduler
    train_ds: Dataset
    valid_ds: Dataset | None  # the training blend's held-out split
    valid_sets: dict[str, Dataset]  # data.valid_sets
    distributed_optimizer: bool


def layout_dict(run: Run) -> dict:
    """The parallel layout a checkpoint records (and resume compares against)."""
    lay = run.layout
    layout = {"world_size": lay.world_size, "tensor": lay.tensor, "pipeline": lay.pipeline,
              "expert": lay.expert, "distributed_optimizer": run.distributed_optimizer}
    if lay.virtual_pipeline:  # only when interleaved: older checkpoints compare equal
        layout["virtual_pipeline"] = lay.virtual_pipeline
    return layout


def use_distributed_optimizer(cfg: Config) -> bool:
    if cfg.parallel.distributed_optimizer is not None:
        return cfg.parallel.distributed_optimizer
    return torch.cuda.is_available()


def build_run(cfg: Config, derived: Derived, layout: Layout) -> Run:
    """``derived``: ``config.derived.derive(cfg)``, made once after validation."""
    # Data first: a damaged or mismatched dataset is reported in seconds, not after a large model
    # is allocated (building datasets draws no torch random numbers: the model init is unchanged).
    data = build_datasets(cfg, derived)
    backends = resolve_backends(cfg)
    distributed = use_distributed_optimizer(cfg)
    chunks = [_wrap(layout, chunk, backends, distributed, index)
              for index, chunk in enumerate(build_model_chunks(cfg, backends, derived))]
    tconfig = chunks[0].config
    # The schedule calls these between micro-batches and after the last backward (megatron
    # takes one no_sync per chunk with an interleaved pipeline).
    no_sync = [chunk.no_sync for chunk in chunks]
    tconfig.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    model = as_model(chunks)
    optimizer = build_optimizer(cfg, chunks, backends.precision == "bf16", distributed)
    scheduler = build_scheduler(cfg, optimizer, derived.total_steps)
    return Run(cfg, derived, layout, backends, model, optimizer, scheduler, data.train,
               data.valid, data.valid_sets, distributed)


def _wrap(layout: Layout, model: torch.nn.Module, backends: Backends, distributed: bool,
          index: int) -> DistributedDataParallel:
    """One model chunk on its device, in bf16 if so configured, under megatron's DDP."""
    tconfig = model.config
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    mark_expert_params(model)
    if backends.precision == "bf16":
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=distributed, check_for_nan_in_grad=False,
        bucket_size=None if layout.data == 1 else 40_000_000,
    )
    # As megatron's training loop: only the first chunk's gradients are bucketed.
    return DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model,
                                   disable_bucketing=index > 0)


def mark_expert_params(model: torch.nn.Module) -> None:
    """Treat expert weights as expert-parallel even at EP=1.

    megatron flags expert weights ``allreduce=False`` only when EP > 1, and the optimizer puts
    flagged weights into a second (chained) optimizer. The optimizer's checkpoint structure would
    then differ between EP=1 and EP>1 and could not be resumed across that change. At EP=1 the
    expert-data-parallel group equals the data-parallel group, so the gradients are unchanged.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


@dataclass
class Datasets:
    train: Dataset
    valid: Dataset | None  # the training blend's held-out split (val_loss)
    valid_sets: dict[str, Dataset]  # data.valid_sets, each its sources' held-out split


def build_datasets(cfg: Config, derived: Derived) -> Datasets:
    """Training data for ``derived.total_steps`` and the validation sets. Validation reads the
    same ``eval_iters`` global batches at every ``eval_interval``, so its curve moves only with
    the weights."""
    d, tr = cfg.data, cfg.train
    n_eval = tr.eval_iters * tr.global_batch_size if tr.eval_interval else 0
    num_samples = (derived.total_steps * tr.global_batch_size, n_eval, 0)
    if d.mock:
        train, valid, _ = D.build_mock_datasets(d.seq_length, tr.seed, num_samples,
                                                cfg.model.vocab_size, d.split)
        return Datasets(train, valid if n_eval else None, {})
    blend, tokenizer_path, cache_dir = list(d.blend), d.tokenizer, d.cache_dir
    demo: dict[str, str] = {}
    if d.demo_corpus:
        tokenizer_path, prefixes = ensure_demo_data()
        demo = {f"{DEMO_PREFIX}{Path(p).name}": p for p in prefixes}  # demo:en -> .../en
        # a blend naming demo languages trains on those only (e.g. a BTX domain branch)
        blend = _demo_sources("data.blend", blend, demo) if blend else prefixes
        cache_dir = cache_dir or str(Path(tokenizer_path).parent / "index-cache")
    tok = load_tokenizer(tokenizer_path)

    def build(sources: list, samples: tuple[int, int, int]) -> tuple:
        # Scanning the token ids catches data made with another tokenizer: every token of a
        # small .bin, evenly spaced windows of a cluster-sized one (datasets.build_gpt_datasets).
        return D.build_gpt_datasets(sources, d.split, d.seq_length, tr.seed, samples, tok,
                                    cache_dir, model_vocab_size=derived.padded_vocab,
                                    scan_max_token=True)

    train, valid, _ = build(blend, num_samples)
    named = {}
    for name, source in derived.valid_sets.items():
        sources = _demo_sources(f"data.valid_sets.{name}",
                                source if isinstance(source, list) else [source], demo)
        # Only the held-out split is read: a one-sample training split is all megatron needs.
        named[name] = build(sources, (1, n_eval, 0))[1]
    return Datasets(train, valid if n_eval else None, named)


def _demo_sources(field: str, sources: list, demo: dict[str, str]) -> list:
    """``sources`` with each ``demo:<language>`` replaced by that demo prefix; ConfigError
    names one that is not a demo corpus language."""
    resolved = [demo.get(x, x) if isinstance(x, str) else x for x in sources]
    unknown = [x for x in resolved if isinstance(x, str) and x.startswith(DEMO_PREFIX)]
    if unknown:
        raise ConfigError(f"{field}: {unknown[0]} is not a demo corpus language "
                          f"(have {', '.join(sorted(demo))})")
    return resolved


def dp_rank_and_size() -> tuple[int, int]:
    return (parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size())


def run_dir(cfg: Config) -> Path:
    # pretrain_moe.py resolves None to runs/<config name>; other callers get the plain default.
    return Path(cfg.logging.output_dir or "runs/default")
