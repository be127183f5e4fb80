"""Command line of pretrain_moe.py: parse -> validate -> (print | dry-run | train)."""

from __future__ import annotations

import argparse
import warnings
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from megatron_ext.config.loader import ConfigError, load_config, to_yaml
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import (
    check_paths, launched_world_size, planned_world_size, total_steps, validate,
)
from megatron_ext.training.exit_codes import CONFIG as EXIT_CONFIG
from megatron_ext.training.exit_codes import FAILED as EXIT_FAILED
from megatron_ext.training.exit_codes import OK as EXIT_OK

# megatron-core warns at import when TE/apex are absent; the "backends:" log line says what runs.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
# Internal deprecations inside megatron-core 0.16.1 / torch that a user cannot act on.
for _msg in ("full scope is deprecated", "Please use DTensor instead",
             "`load_state_dict` is deprecated", "moe_ffn_hidden_size is not set"):
    warnings.filterwarnings("ignore", message=_msg)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain_moe.py",
        description="Pretrain a (Mixture-of-Experts) GPT with megatron-core. Exit codes: 0 done "
        "(or preempted by SIGTERM/SIGUSR1 and saved: rerun to resume), 1 failure, 2 config or "
        "checkpoint error, 4 too many non-finite steps.",
    )
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config field (value parsed as YAML); repeatable")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved config as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, count parameters, show layout and memory estimates; no training")
    return p.parse_args(argv)


def _rank0() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def dry_run(cfg: Config) -> str:
    from megatron_ext.model.params import count_params, flops_per_token, memory_estimate_gb, \
        padded_vocab

    c = count_params(cfg)
    world = planned_world_size(cfg)
    par = cfg.parallel
    dp = world // (par.tensor * par.pipeline)
    mem = memory_estimate_gb(cfg, world, bf16=cfg.train.precision != "fp32")
    steps = total_steps(cfg)
    lines = [
        f"parameters: total {c.total / 1e9:.3f}B ({c.total:,}), "
        f"active per token {c.active / 1e9:.3f}B ({c.active:,})",
        f"  embedding+output {c.embedding:,} | attention {c.attention:,} | experts "
        f"{c.experts_total:,} ({c.moe_layers} MoE layers) | dense MLP {c.dense_mlp:,} | "
        f"router {c.router:,} | norms {c.norms:,}",
        f"vocab: {cfg.model.vocab_size} padded to {padded_vocab(cfg)}",
        f"layout: world {world} = tp {par.tensor} x pp {par.pipeline} x dp {dp}; "
        f"ep {par.expert} (experts per rank {cfg.moe.num_experts // par.expert if cfg.moe.num_experts else 0})",
        f"batch: global {cfg.train.global_batch_size} x seq {cfg.data.seq_length} = "
        f"{cfg.train.global_batch_size * cfg.data.seq_length:,} tokens/step, "
        f"micro {cfg.train.micro_batch_size}, grad accumulation "
        f"{cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)}",
        f"steps: {steps:,} ({steps * cfg.train.global_batch_size * cfg.data.seq_length / 1e9:.1f}B "
        f"tokens), {flops_per_token(cfg) / 1e9:.2f} GFLOP/token",
        "memory per GPU (estimate, GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
        + {"full": " (full recompute)", "selective": " (selective recompute not modelled: "
           "activations are an upper bound)"}.get(cfg.train.recompute, ""),
    ]
    built = _meta_param_count(cfg)
    status = "matches" if built == c.total else f"DIFFERS from {c.total:,}"
    lines.append(f"megatron-core model built on the meta device (one rank, no parallelism): "
                 f"{built:,} parameters ({status} the count above)")
    return "\n".join(lines)


def _meta_param_count(cfg: Config) -> int:
    """Build the real GPTModel without allocating (meta device) to cross-check the arithmetic."""
    import copy

    import torch

    from megatron_ext.model.builder import build_model, resolve_backends
    from megatron_ext.platform.dist import init_distributed, shutdown

    one = copy.deepcopy(cfg)
    one.parallel.tensor = one.parallel.expert = one.parallel.pipeline = one.parallel.world_size = 1
    one.parallel.sequence_parallel = False
    one.train.precision = "fp32"
    one.train.global_batch_size = one.train.micro_batch_size
    init_distributed(one, standalone=True)
    try:
        with torch.device("meta"):
            model = build_model(one, resolve_backends(one, cuda=False))
        return sum(p.numel() for p in model.parameters())
    finally:
        shutdown()


def train_main(cfg: Config) -> int:
    from megatron_ext.checkpoint import dist as ckpt
    from megatron_ext.platform.dist import init_distributed, shutdown
    from megatron_ext.training.cuda_graph import step_stream
    from megatron_ext.training.loop import Preemption

    # Installed first: a signal during model/data building or checkpoint loading must also end
    # in "save (once training runs) and exit 0", not in the default kill.
    preempt = Preemption()
    layout = init_distributed(cfg)
    try:
        # train.cuda_graph: the whole run, model building included, on one side stream (capture
        # cannot use the default stream, and megatron's DDP keeps AccumulateGrad nodes that
        # belong to the stream they were made on).
        with step_stream(cfg.train.cuda_graph):
            return _run(cfg, layout, preempt)
    except ckpt.CheckpointError as e:
        if layout.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        shutdown()


def _run(cfg: Config, layout: Any, preempt: Any) -> int:
    """Build, resume or initialise, train; returns the exit code."""
    from megatron_ext.checkpoint import dist as ckpt
    from megatron_ext.config.loader import to_dict
    from megatron_ext.training.loggers import MetricsWriter, log, warn
    from megatron_ext.training.loop import layout_dict, train
    from megatron_ext.training.setup import build_run, run_dir

    rank0 = layout.rank == 0
    run = build_run(cfg, layout)
    if rank0:
        log(f"layout: {layout.describe()}")
        log(f"backends: {run.backends.describe()}")
    out = run_dir(cfg)
    resolved = to_dict(cfg)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    state = ckpt.TrainState()
    resume, warnings = (ckpt.find_resumable(cfg.checkpoint.save)
                        if cfg.checkpoint.save else (None, []))
    for w in warnings:
        warn(w) if rank0 else None
    if resume is not None:
        ckpt.check_compatible(resume, resolved)
        state, warnings = ckpt.load(resume, run.model, run.optimizer, layout_dict(run))
        run.scheduler.load_state_dict(state.scheduler)
        for w in warnings:
            warn(w) if rank0 else None
        if rank0:
            log(f"resumed from {resume} at step {state.step}")
    elif cfg.checkpoint.load:
        path = ckpt.load_weights(cfg.checkpoint.load, run.model)
        if rank0:
            log(f"initial weights from {path}")
    writer = MetricsWriter(cfg.logging, out, resolved, cfg.logging.wandb.name or "run",
                           enabled=rank0)
    try:
        code, summary = train(run, state, writer, preempt)
    finally:
        writer.close()
    if rank0:
        log(_summary_line(summary, cfg, writer.jsonl_path))
    return code


def _summary_line(s: dict, cfg: Config, metrics_path: Path) -> str:
    fl = "n/a" if s["first_loss"] is None else f"{s['first_loss']:.4f}"
    ll = "n/a" if s["last_loss"] is None else f"{s['last_loss']:.4f}"
    where = cfg.checkpoint.save or "(checkpoint.save not set)"
    return (f"summary: {s['status']} | steps {s['steps']} | tokens {s['tokens']:,} | first loss {fl} | "
            f"last loss {ll} | skipped {s['skipped_steps']} | wall {s['wall_s']:.1f}s | "
            f"checkpoint {where} | metrics {metrics_path}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    info_only = args.print_config or args.dry_run
    try:
        cfg = load_config(args.config, args.overrides)
        # --dry-run / --print-config reason about the planned size (parallel.world_size); a
        # training launch is checked against the processes it really has.
        validate(cfg, world_size=None if info_only else launched_world_size())
        if cfg.logging.wandb.name is None and args.config:
            cfg.logging.wandb.name = Path(args.config).stem
        if not info_only:
            check_paths(cfg)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return EXIT_OK
    if args.dry_run:
        print(dry_run(cfg))
        return EXIT_OK
    from megatron_ext.data.errors import DataError
    from megatron_ext.training.cuda_graph import GraphCaptureError

    try:
        return train_main(cfg)
    except (ConfigError, DataError, GraphCaptureError) as e:  # found while building (backend,
        return _fail(f"error: {e}")                            # tokenizer, data) or capturing
    except Exception:  # noqa: BLE001 - report, then a distinct exit code for the launcher
        traceback.print_exc()
        return EXIT_FAILED


def _fail(line: str) -> int:
    if _rank0():
        print(line, file=sys.stderr, flush=True)
    return EXIT_CONFIG
