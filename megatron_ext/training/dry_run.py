"""``pretrain_moe.py --dry-run``: parameters, layout, steps and memory of a validated config,
cross-checked by building the real megatron-core model on the meta device (nothing allocated).

It never ends in a traceback: a failure is one stderr line, exit 2 when the config is at fault
(ConfigError, DataError) and 1 otherwise -- a config that passed validation but cannot be
estimated or built is a gap in ``megatron_ext.config.validate``, i.e. a bug.
"""

from __future__ import annotations

import copy
import sys

from megatron_ext.config.derived import derive
from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import planned_world_size
from megatron_ext.data.errors import DataError
from megatron_ext.errors import UserError
from megatron_ext.model.params import count_params, flops_per_token, memory_estimate_gb
from megatron_ext.model.planner.report import plan_text, step_line
from megatron_ext.model.planner.step import predict
from megatron_ext.platform import launch
from megatron_ext.training.exit_codes import CONFIG as EXIT_CONFIG
from megatron_ext.training.exit_codes import FAILED as EXIT_FAILED
from megatron_ext.training.exit_codes import OK as EXIT_OK

# Building the meta model costs a few ms per (layer x expert) on a CPU: past this many (about a
# minute), the cross-check is skipped and said so. DeepSeek-V3's 61 x 256 still builds.
META_BUILD_MAX_EXPERT_LAYERS = 16384


def main(cfg: Config, rank0: bool = True) -> int:
    """Print the report (stdout) or one error line (stderr, rank 0 only); the exit code."""
    return _report(lambda: dry_run(cfg), "--dry-run", (ConfigError, DataError), "config error",
                   rank0, every_rank=True)


def plan_main(cfg: Config, nodes: int, top: int | None, rank0: bool = True) -> int:
    """``--plan``: the ranked layouts of ``nodes`` nodes (stdout), or one error line."""
    return _report(lambda: plan_text(cfg, nodes, top), "--plan", (UserError,), "error", rank0)


def _report(make, what: str, known: tuple, prefix: str, rank0: bool,
            every_rank: bool = False) -> int:
    """Print ``make()``'s text, or one error line: ``known`` errors are the user's (exit 2),
    anything else is ours (exit 1, named as a bug)."""
    try:
        text = make()
    except known as e:
        return _fail(f"{prefix}: {e}", EXIT_CONFIG, rank0)
    except Exception as e:  # noqa: BLE001 - any other failure is ours: one line, exit 1
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        return _fail(f"error: {what} failed ({type(e).__name__}: {reason}); this is a bug, "
                     f"please report it with the config", EXIT_FAILED, rank0)
    if rank0 or every_rank:
        print(text, flush=True)
    return EXIT_OK


def _fail(line: str, code: int, rank0: bool) -> int:
    if rank0:
        print(line, file=sys.stderr, flush=True)
    return code


def dry_run(cfg: Config) -> str:
    derived = derive(cfg)  # here, not in main: a failure is the report's one line
    c = count_params(cfg.model, cfg.moe)
    flops = flops_per_token(cfg.model, cfg.moe, cfg.data.seq_length)
    world = planned_world_size(cfg, launch.world_size())
    par = cfg.parallel
    dp = world // (par.tensor * par.pipeline)
    mem = memory_estimate_gb(cfg, world, bf16=cfg.train.precision != "fp32")
    steps = derived.total_steps
    lines = [
        f"parameters: total {c.total / 1e9:.3f}B ({c.total:,}), "
        f"active per token {c.active / 1e9:.3f}B ({c.active:,})",
        f"  embedding+output {c.embedding:,} | attention {c.attention:,} | experts "
        f"{c.experts_total:,} ({c.moe_layers} MoE layers) | dense MLP {c.dense_mlp:,} | "
        f"router {c.router:,} | norms {c.norms:,}",
        f"vocab: {cfg.model.vocab_size} padded to {derived.padded_vocab}",
        f"layout: world {world} = tp {par.tensor} x pp {par.pipeline} x dp {dp}; "
        f"ep {par.expert} (experts per rank {cfg.moe.num_experts // par.expert})",
        f"batch: global {cfg.train.global_batch_size} x seq {cfg.data.seq_length} = "
        f"{cfg.train.global_batch_size * cfg.data.seq_length:,} tokens/step, "
        f"micro {cfg.train.micro_batch_size}, grad accumulation "
        f"{cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)}",
        f"steps: {steps:,} ({steps * cfg.train.global_batch_size * cfg.data.seq_length / 1e9:.1f}B "
        f"tokens), {flops / 1e9:.2f} GFLOP/token",
        "memory per GPU (estimate, GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
        + {"full": " (full recompute)", "selective": " (selective recompute not modelled: "
           "activations are an upper bound)"}.get(cfg.train.recompute, ""),
        step_line(predict(cfg, world), cfg),
    ]
    units = cfg.model.num_layers * max(1, cfg.moe.num_experts)
    if units > META_BUILD_MAX_EXPERT_LAYERS:
        lines.append(f"megatron-core model not built on the meta device: {cfg.model.num_layers} "
                     f"layers x {cfg.moe.num_experts} experts would take minutes (limit "
                     f"{META_BUILD_MAX_EXPERT_LAYERS:,} expert-layers); the counts above are "
                     f"arithmetic only")
        return "\n".join(lines)
    built = _meta_param_count(cfg)
    status = "matches" if built == c.total else f"DIFFERS from {c.total:,}"
    lines.append(f"megatron-core model built on the meta device (one rank, no parallelism): "
                 f"{built:,} parameters ({status} the count above)")
    return "\n".join(lines)


def _meta_param_count(cfg: Config) -> int:
    """Build the real GPTModel without allocating (meta device) to cross-check the arithmetic."""
    # torch and megatron-core load here, not at import: --print-config and config errors stay fast.
    import torch

    from megatron_ext.model.builder import build_model, resolve_backends
    from megatron_ext.platform.dist import init_distributed, shutdown

    one = copy.deepcopy(cfg)
    one.parallel.tensor = one.parallel.expert = one.parallel.pipeline = one.parallel.world_size = 1
    one.parallel.sequence_parallel = False
    one.train.precision = "fp32"
    one.train.global_batch_size = one.train.micro_batch_size
    # The build runs here, on a CPU, where te/flash may be absent; core attention holds no
    # parameters, so the count does not depend on it.
    one.model.attention_backend = "auto"
    init_distributed(one, standalone=True)
    try:
        with torch.device("meta"):
            model = build_model(one, resolve_backends(one, cuda=False))
        return sum(p.numel() for p in model.parameters())
    finally:
        shutdown()
