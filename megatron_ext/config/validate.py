"""Cross-field checks, run before any process group or tensor exists.

Each failure raises ConfigError with ``field: reason`` so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config


def moe_layer_pattern(cfg: Config) -> list[int]:
    """1 for MoE layers, 0 for dense ones (all 0 for a dense model)."""
    L = cfg.model.num_layers
    if cfg.moe.num_experts == 0:
        return [0] * L
    freq = cfg.moe.layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(L)]
    return [int(x) for x in freq]


def launched_world_size() -> int:
    """Processes of the current launch (torchrun / srun), 1 for a plain ``python`` run."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def planned_world_size(cfg: Config) -> int:
    """What --dry-run / --print-config reason about: the config's plan, else the launch."""
    if cfg.parallel.world_size is not None:
        return cfg.parallel.world_size
    return launched_world_size()


def data_parallel_size(cfg: Config, world_size: Optional[int] = None) -> int:
    world = planned_world_size(cfg) if world_size is None else world_size
    return world // (cfg.parallel.tensor * cfg.parallel.pipeline)


def _check(cond: bool, field: str, reason: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {reason}")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.train
    world = planned_world_size(cfg) if world_size is None else world_size

    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "vocab_size", "vocab_multiple", "max_position_embeddings"):
        _check(getattr(m, name) > 0, f"model.{name}", "must be positive")
    kv = m.num_kv_heads or m.num_attention_heads
    _check(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
           f"{m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}")
    _check(kv > 0 and m.num_attention_heads % kv == 0, "model.num_kv_heads",
           f"num_attention_heads={m.num_attention_heads} is not divisible by num_kv_heads={kv}")
    _check(m.num_attention_heads % par.tensor == 0, "parallel.tensor",
           f"num_attention_heads={m.num_attention_heads} is not divisible by tensor={par.tensor}")
    _check(kv % par.tensor == 0, "parallel.tensor",
           f"num_kv_heads={kv} is not divisible by tensor={par.tensor}")
    _check(m.vocab_multiple % par.tensor == 0, "model.vocab_multiple",
           f"{m.vocab_multiple} is not divisible by tensor={par.tensor}")
    _check(m.ffn_hidden_size % par.tensor == 0, "parallel.tensor",
           f"ffn_hidden_size={m.ffn_hidden_size} is not divisible by tensor={par.tensor}")

    if moe.num_experts == 0:
        _check(par.expert == 1, "parallel.expert", "expert parallelism needs moe.num_experts > 0")
    else:
        _check(moe.num_experts > 0, "moe.num_experts", "must be >= 0")
        _check(1 <= moe.top_k <= moe.num_experts, "moe.top_k",
               f"top_k={moe.top_k} must be between 1 and num_experts={moe.num_experts}")
        _check(moe.num_experts % par.expert == 0, "parallel.expert",
               f"num_experts={moe.num_experts} is not divisible by expert={par.expert}")
        _check(moe.aux_loss_coeff >= 0, "moe.aux_loss_coeff", "must be >= 0")
        if isinstance(moe.layer_freq, int):
            _check(moe.layer_freq >= 1, "moe.layer_freq", "must be >= 1")
        else:
            _check(len(moe.layer_freq) == m.num_layers, "moe.layer_freq",
                   f"has {len(moe.layer_freq)} entries, expected num_layers={m.num_layers}")
            _check(all(x in (0, 1) for x in moe.layer_freq), "moe.layer_freq",
                   "entries must be 0 (dense) or 1 (MoE)")
            _check(any(moe.layer_freq), "moe.layer_freq", "no layer is MoE; set num_experts: 0")
        if moe.capacity_factor is not None:
            _check(moe.capacity_factor > 0, "moe.capacity_factor", "must be > 0")
        _check(not moe.pad_to_capacity or moe.capacity_factor is not None,
               "moe.pad_to_capacity", "needs moe.capacity_factor")
        if moe.token_dispatcher == "local":
            _check(par.expert == 1 and par.tensor == 1, "moe.token_dispatcher",
                   "local needs parallel.expert=1 and parallel.tensor=1 (use auto)")
            _check(moe.capacity_factor is None, "moe.token_dispatcher",
                   "local is dropless; with moe.capacity_factor use allgather or alltoall")

    for name in ("tensor", "pipeline", "expert"):
        _check(getattr(par, name) >= 1, f"parallel.{name}", "must be >= 1")
    _check(not par.sequence_parallel or par.tensor > 1, "parallel.sequence_parallel",
           "needs tensor > 1")
    _check(moe.num_experts == 0 or par.tensor == 1 or par.sequence_parallel,
           "parallel.sequence_parallel", "megatron-core needs it for MoE with tensor > 1")
    _check(par.pipeline == 1, "parallel.pipeline",
           "pipeline parallelism is not supported yet by this framework's loop")
    _check(world % (par.tensor * par.pipeline) == 0, "parallel.tensor",
           f"world size {world} is not divisible by tensor*pipeline={par.tensor * par.pipeline}")
    dp = world // (par.tensor * par.pipeline)
    _check(dp % par.expert == 0, "parallel.expert",
           f"data-parallel size {dp} (world {world} / tensor*pipeline) is not divisible by "
           f"expert={par.expert}")

    _check(tr.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _check(tr.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
    _check(tr.global_batch_size % (tr.micro_batch_size * dp) == 0, "train.global_batch_size",
           f"{tr.global_batch_size} is not divisible by micro_batch_size*data_parallel="
           f"{tr.micro_batch_size}*{dp}")
    _check(tr.train_steps is not None or tr.train_tokens is not None, "train.train_steps",
           "give train_steps or train_tokens")
    if tr.train_tokens is not None:
        _check(tr.train_tokens > 0, "train.train_tokens", "must be positive")
    elif tr.train_steps is not None:
        _check(tr.train_steps > 0, "train.train_steps", "must be positive")
    _check(tr.log_interval >= 1, "train.log_interval", "must be >= 1")
    _check(tr.eval_interval >= 0 and tr.eval_iters >= 1, "train.eval_interval",
           "eval_interval must be >= 0 and eval_iters >= 1")
    _check(tr.max_skipped_steps >= 0, "train.max_skipped_steps", "must be >= 0")
    _check(tr.peak_tflops > 0, "train.peak_tflops", "must be positive")
    _check_recompute(cfg)
    _check_cuda_graph(cfg)

    opt = cfg.optimizer
    _check(0 <= opt.min_lr <= opt.lr, "optimizer.min_lr",
           f"need 0 <= min_lr ({opt.min_lr}) <= lr ({opt.lr})")
    _check(0 <= opt.adam_beta1 < 1 and 0 <= opt.adam_beta2 < 1, "optimizer.adam_beta1",
           "betas must be in [0, 1)")
    _check(opt.clip_grad >= 0 and opt.weight_decay >= 0, "optimizer.clip_grad",
           "clip_grad and weight_decay must be >= 0")
    steps = total_steps(cfg)
    _check(cfg.schedule.decay_steps is None or cfg.schedule.decay_steps >= 1,
           "schedule.decay_steps", "must be >= 1 (or null for train_steps)")
    decay = cfg.schedule.decay_steps or steps
    # megatron's scheduler needs the decay to extend past the warmup.
    _check(cfg.schedule.warmup_steps == 0 or 0 < cfg.schedule.warmup_steps < decay,
           "schedule.warmup_steps",
           f"{cfg.schedule.warmup_steps} must be 0 or less than the decay steps ({decay})")

    d = cfg.data
    _check(d.seq_length >= 2, "data.seq_length", "must be >= 2")
    _check(d.seq_length <= m.max_position_embeddings, "data.seq_length",
           f"{d.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    if not d.mock and not d.demo_corpus:
        _check(len(d.blend) > 0, "data.blend", "empty: give datasets, or set data.mock: true")
        _check(d.tokenizer is not None, "data.tokenizer", "needed with data.blend")
    parts = d.split.split(",")
    _check(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
           "data.split", f"{d.split!r} is not like '998,1,1'")

    ck = cfg.checkpoint
    _check(ck.save_interval >= 0, "checkpoint.save_interval", "must be >= 0")
    _check(ck.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")

    up = cfg.upcycling
    _check(0.0 <= up.ratio <= 1.0, "upcycling.ratio", f"{up.ratio} is outside [0, 1]")


RECOMPUTE_MODULES = ("core_attn", "layernorm", "moe_act", "mlp", "moe")


def _check_recompute(cfg: Config) -> None:
    tr, moe = cfg.train, cfg.moe
    mods = tr.recompute_modules
    _check(isinstance(mods, list) and all(isinstance(x, str) for x in mods),
           "train.recompute_modules", "must be a list of names")
    unknown = [x for x in mods if x not in RECOMPUTE_MODULES]
    _check(not unknown, "train.recompute_modules",
           f"unknown {unknown}; choose from {', '.join(RECOMPUTE_MODULES)}")
    if tr.recompute != "selective":
        _check(mods == ["core_attn"], "train.recompute_modules",
               f"only used with train.recompute: selective (it is {tr.recompute!r})")
        return
    _check(len(mods) > 0, "train.recompute_modules", "empty: nothing to recompute")
    if "moe_act" in mods or "moe" in mods:
        _check(moe.num_experts > 0, "train.recompute_modules", "moe_act/moe need MoE layers")
    if "moe_act" in mods:
        _check(moe.grouped_gemm, "train.recompute_modules",
               "moe_act needs grouped experts (moe.grouped_gemm: true)")


def _check_cuda_graph(cfg: Config) -> None:
    """A captured step replays the same kernels on the same buffers: nothing in it may depend
    on the host (megatron's alltoall/allgather dispatchers move token counts to the host; its
    recomputation forks the CUDA RNG state; NaN injection changes the step)."""
    tr, moe, par = cfg.train, cfg.moe, cfg.parallel
    if not tr.cuda_graph:
        return
    if moe.num_experts > 0:
        _check(moe.token_dispatcher in ("auto", "local") and par.expert == 1 and par.tensor == 1
               and moe.capacity_factor is None, "train.cuda_graph",
               "needs the local token dispatcher: parallel.expert=1, parallel.tensor=1, no "
               "moe.capacity_factor, moe.token_dispatcher auto or local")
        _check(moe.grouped_gemm, "train.cuda_graph",
               "needs moe.grouped_gemm: true (the per-expert loop reads token counts on the host)")
    _check(tr.recompute == "none", "train.cuda_graph", "cannot be combined with train.recompute")
    _check(not tr.nan_injection_steps, "train.cuda_graph",
           "cannot be combined with train.nan_injection_steps")


def check_paths(cfg: Config) -> None:
    """Existence of the files a training run reads (not part of ``validate``: configs for
    clusters name paths that do not exist on the machine that checks them)."""
    d = cfg.data
    if not d.mock and not d.demo_corpus:
        _check(Path(d.tokenizer).exists(), "data.tokenizer", f"not found: {d.tokenizer}")
        for item in d.blend:
            if isinstance(item, str):
                for ext in (".bin", ".idx"):
                    _check(Path(item + ext).is_file(), "data.blend", f"not found: {item}{ext}")
    if cfg.checkpoint.load is not None:
        _check(Path(cfg.checkpoint.load).exists(), "checkpoint.load",
               f"not found: {cfg.checkpoint.load}")


def total_steps(cfg: Config) -> int:
    tr = cfg.train
    if tr.train_tokens is not None:
        per_step = tr.global_batch_size * cfg.data.seq_length
        return -(-tr.train_tokens // per_step)
    return int(tr.train_steps)
