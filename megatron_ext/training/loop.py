"""The training loop: megatron-core forward/backward schedule, optimizer step, metrics, saves.

Exit codes: ``megatron_ext.training.exit_codes``.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from megatron_ext.checkpoint import dist as ckpt
from megatron_ext.checkpoint.saver import Saver
from megatron_ext.config.loader import to_dict
from megatron_ext.model.params import flops_per_token
from megatron_ext.training.batches import MicroBatches
from megatron_ext.training.cuda_graph import StaticInputs, StepGraph
from megatron_ext.training.loggers import MetricsWriter, format_line, log, warn
from megatron_ext.training.optim import clip_and_step, prepare_and_norm
from megatron_ext.training.router_stats import RouterStats
from megatron_ext.training.setup import Run, dp_rank_and_size
from megatron_ext.training.signals import Preemption

from megatron_ext.training import exit_codes

EXIT_OK, EXIT_NONFINITE = exit_codes.OK, exit_codes.NONFINITE


def _forward_step_factory(nan_step: bool):
    def forward_step(data_iterator: Iterator, model):
        batch = next(data_iterator)
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output):
            mask = batch["loss_mask"]
            loss_sum = (output.float() * mask).sum()
            if nan_step:
                loss_sum = loss_sum * float("nan")
            ntok = mask.sum()
            # megatron divides the returned loss by ntok and the number of micro-batches.
            return loss_sum, ntok.int(), {"lm": torch.stack([loss_sum.detach(), ntok.detach()])}

        return losses, loss_func

    return forward_step


def _reduce_loss(reports: list[dict], device) -> float:
    if not reports:
        return float("nan")
    tot = torch.stack([r["lm"] for r in reports]).sum(0).to(device)
    if dist.is_initialized():
        dist.all_reduce(tot, group=parallel_state.get_data_parallel_group())
    return (tot[0] / tot[1].clamp(min=1)).item()


def _router_losses(forwards: int) -> dict[str, float]:
    """Unscaled load-balancing (and z-) loss per micro-batch, averaged over MoE layers.

    megatron's router adds each forward's unscaled loss into a per-layer tracker; ``forwards`` is
    the number of micro-batch forwards since the last clear.
    """
    out = {}
    tracker = get_moe_layer_wise_logging_tracker()
    for name, key in (("load_balancing_loss", "aux_loss"), ("z_loss", "z_loss")):
        vals = tracker.get(name, {}).get("values")
        if vals is None:
            continue
        vals = vals.clone().float()
        if dist.is_initialized():
            # As megatron's reduce_aux_losses_tracker_across_ranks (whose AVG op gloo lacks):
            # sum over the router's reduce group (TP ranks each saw part of the sequence with
            # sequence parallelism), then average over data-parallel ranks.
            entry = tracker[name]
            if entry.get("reduce_group") is not None:
                dist.all_reduce(vals, group=entry["reduce_group"])
            if not entry.get("reduce_group_has_dp", False):
                dist.all_reduce(vals, group=parallel_state.get_data_parallel_group())
                vals /= parallel_state.get_data_parallel_world_size()
        nz = vals[vals != 0]
        out[key] = nz.mean().item() / max(forwards, 1) if nz.numel() else 0.0
    clear_aux_losses_tracker()
    return out


def evaluate(run: Run, consumed_eval: int) -> dict[str, float]:
    cfg = run.cfg
    dp_rank, dp = dp_rank_and_size()
    mb = MicroBatches(run.valid_ds, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                      dp, dp_rank, run.layout.device)
    fb = get_forward_backward_func()
    reports = []
    # Validation forwards also feed megatron's aux-loss tracker; keep the training window's sums.
    tracker = get_moe_layer_wise_logging_tracker()
    saved = {k: v["values"].clone() for k, v in tracker.items() if "values" in v}
    run.model.eval()
    with torch.no_grad():
        for i in range(cfg.train.eval_iters):
            it = mb.step(consumed_eval + i * cfg.train.global_batch_size)
            reports += fb(forward_step_func=_forward_step_factory(False), data_iterator=it,
                          model=[run.model], num_microbatches=mb.num_microbatches,
                          seq_length=cfg.data.seq_length,
                          micro_batch_size=cfg.train.micro_batch_size, forward_only=True)
    run.model.train()
    for k, v in saved.items():
        tracker[k]["values"].copy_(v)
    loss = _reduce_loss(reports, run.layout.device)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def train(run: Run, state: ckpt.TrainState, writer: MetricsWriter,
          preempt: Preemption | None = None) -> tuple[int, dict]:
    """Train from ``state`` to the end (or a stop). Returns (exit code, summary)."""
    ck = run.cfg.checkpoint
    saver = (Saver(ck.save, ck.keep_last, ck.fully_reshardable_optimizer, ck.async_save)
             if ck.save else None)
    stats = RouterStats(run.model, run.cfg.moe.top_k) if run.cfg.logging.expert_load else None
    t_start = time.time()
    try:
        code, status, losses = _steps(run, state, writer, preempt or Preemption(), saver, stats)
        if saver is not None:
            _log_saved(run, saver.wait(), writer, state.step)
    except BaseException:
        if saver is not None:
            saver.close(abort=True)  # an unfinished background write must not become latest
        raise
    finally:
        if stats is not None:
            stats.remove()
    summary = {"status": status, "steps": state.step, "tokens": state.consumed_tokens,
               "first_loss": losses[0], "last_loss": losses[1], "wall_s": time.time() - t_start,
               "skipped_steps": state.skipped_steps}
    return code, summary


def _steps(run: Run, state: ckpt.TrainState, writer: MetricsWriter, preempt: Preemption,
           saver: Saver | None, stats: RouterStats | None) -> tuple[int, str, list]:
    """The step loop; returns (exit code, status, [first loss, last loss])."""
    cfg, layout, tr = run.cfg, run.layout, run.cfg.train
    dp_rank, dp = dp_rank_and_size()
    micro = MicroBatches(run.train_ds, tr.global_batch_size, tr.micro_batch_size, dp, dp_rank,
                         layout.device)
    fb = get_forward_backward_func()
    tokens_per_step = tr.global_batch_size * cfg.data.seq_length
    fpt = flops_per_token(cfg)
    resolved = to_dict(cfg)
    layout_key = layout_dict(run)
    losses = [None, None]
    t_start = time.time()
    window = _new_window()
    # train.cuda_graph: the forward+backward of all micro-batches replays one captured graph
    # that reads its inputs from fixed buffers (validation excluded NaN injection).
    use_graph = tr.cuda_graph and torch.cuda.is_available()
    if tr.cuda_graph and not use_graph and layout.rank == 0:
        warn("train.cuda_graph: no CUDA device, so steps run eagerly")
    graph = StepGraph() if use_graph else None
    inputs = StaticInputs() if use_graph else None
    while state.step < run.total_steps:
        t0 = time.time()
        batches = list(micro.step(state.consumed_samples))
        if inputs is not None:
            batches = inputs.stage(batches)
        t1 = time.time()
        run.model.zero_grad_buffer()
        run.optimizer.zero_grad()
        nan_step = state.step + 1 in tr.nan_injection_steps

        def forward_backward() -> list[dict]:
            return fb(forward_step_func=_forward_step_factory(nan_step),
                      data_iterator=iter(batches), model=[run.model],
                      num_microbatches=micro.num_microbatches, seq_length=cfg.data.seq_length,
                      micro_batch_size=tr.micro_batch_size, forward_only=False)

        reports = forward_backward() if graph is None else graph.run(forward_backward)
        t2 = time.time()
        loss = _reduce_loss(reports, layout.device)
        found_inf, grad_norm = prepare_and_norm(run.optimizer)
        skipped = found_inf or not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            state.skipped_steps += 1
            warn(f"step {state.step + 1}: non-finite loss ({loss}) or grad norm ({grad_norm}); "
                 f"step skipped ({state.skipped_steps}/{tr.max_skipped_steps})") \
                if layout.rank == 0 else None
            if state.skipped_steps > tr.max_skipped_steps:
                if layout.rank == 0:
                    warn(f"stopping: {state.skipped_steps} non-finite steps exceed "
                         f"train.max_skipped_steps={tr.max_skipped_steps}; no checkpoint written")
                return EXIT_NONFINITE, "stopped (non-finite)", losses
        else:
            clip_and_step(run.optimizer, grad_norm, cfg.optimizer.clip_grad)
            run.scheduler.step(increment=1)
        t3 = time.time()
        # The batch is consumed either way: a skipped batch is not retried.
        state.step += 1
        state.consumed_samples += tr.global_batch_size
        state.consumed_tokens += tokens_per_step
        window["steps"] += 1
        window["fb"] += t2 - t1
        window["opt"] += t3 - t2
        window["data"] += t1 - t0
        if not skipped:
            losses = [loss if losses[0] is None else losses[0], loss]
        if saver is not None and saver.pending:
            _log_saved(run, saver.poll(), writer, state.step)

        if state.step % tr.log_interval == 0 or state.step == run.total_steps:
            metrics = _interval_metrics(run, state, window, loss, grad_norm, fpt, stats, t_start)
            if layout.rank == 0:
                log(format_line(state.step, run.total_steps, metrics))
            writer.write(state.step, metrics)
            window = _new_window()

        if run.valid_ds is not None and tr.eval_interval and state.step % tr.eval_interval == 0:
            t_eval = time.time()
            ev = evaluate(run, (state.step // tr.eval_interval - 1) * tr.eval_iters
                          * tr.global_batch_size)
            if layout.rank == 0:
                log(f"validation at step {state.step} | loss {ev['val_loss']:.4f} | "
                    f"ppl {ev['val_ppl']:.2f}")
            writer.write(state.step, ev, kind="valid")
            window["eval"] += time.time() - t_eval

        stop = preempt.requested(layout.device)
        ck = cfg.checkpoint
        periodic = ck.save_interval and state.step % ck.save_interval == 0
        if saver is not None and (stop or periodic or state.step == run.total_steps):
            t_save = time.time()
            state.scheduler = run.scheduler.state_dict()
            committed = saver.save(state, run.model, run.optimizer, resolved, layout_key)
            _log_saved(run, committed, writer, state.step)
            if stop:
                # The job is about to end: finish the write.
                _log_saved(run, saver.wait(), writer, state.step)
            elif saver.pending and layout.rank == 0:
                log(f"writing checkpoint {saver.in_flight[-1][0]} in the background")
            window["save"] += time.time() - t_save
        if stop:
            if layout.rank == 0:
                log(f"received signal {preempt.signum}; saved step {state.step}; exiting "
                    f"(the same command resumes)" if saver is not None
                    else f"received signal {preempt.signum}; no checkpoint.save set, exiting")
            return EXIT_OK, "preempted", losses
    return EXIT_OK, "completed", losses


def _new_window() -> dict:
    """Per-log-interval accumulators. Validation and checkpoint time are kept apart so they do
    not count as training time in tokens/s, TFLOP/s and MFU."""
    return {"t": time.time(), "steps": 0, "fb": 0.0, "opt": 0.0, "data": 0.0, "eval": 0.0,
            "save": 0.0}


def _log_saved(run: Run, committed: list, writer: MetricsWriter, step: int) -> None:
    """Log committed checkpoints; background writes also go to the metrics (kind checkpoint,
    at the step they were committed) so W&B shows how long they take against save_interval."""
    for path, took in committed:
        if run.layout.rank == 0:
            log(f"saved checkpoint {path}" + ("" if took is None else
                                               f" (background write {took:.1f}s)"))
        if took is not None:
            writer.write(step, {"saved_step": int(ckpt.ITER_RE.match(path.name).group(1)),
                                "background_write_s": took}, kind="checkpoint")


def layout_dict(run: Run) -> dict:
    lay = run.layout
    return {"world_size": lay.world_size, "tensor": lay.tensor, "pipeline": lay.pipeline,
            "expert": lay.expert, "distributed_optimizer": run.distributed_optimizer}


def _interval_metrics(run, state, window, loss, grad_norm, fpt, stats, t_start) -> dict:
    cfg, lay = run.cfg, run.layout
    elapsed = max(time.time() - window["t"] - window["eval"] - window["save"], 1e-9)
    n = max(window["steps"], 1)
    tokens_per_s = n * cfg.train.global_batch_size * cfg.data.seq_length / elapsed
    tflops = fpt * tokens_per_s / lay.world_size / 1e12
    remaining = run.total_steps - state.step
    m = {
        "loss": loss, "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, "tokens": state.consumed_tokens,
        "consumed_samples": state.consumed_samples, "tokens_per_s": tokens_per_s,
        "tflops": tflops, "mfu": tflops / cfg.train.peak_tflops,
        "eta_s": remaining * elapsed / n, "skipped": state.skipped_steps,
        "time/step_s": elapsed / n, "time/forward_backward_s": window["fb"] / n,
        "time/optimizer_s": window["opt"] / n, "time/data_s": window["data"] / n,
        "time/eval_s": window["eval"], "time/save_s": window["save"],
        "elapsed_s": time.time() - t_start,
    }
    if cfg.moe.num_experts:
        m.update(_router_losses(n * cfg.train.global_batch_size
                                // (cfg.train.micro_batch_size * lay.data)))
    if torch.cuda.is_available():
        m["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        torch.cuda.reset_peak_memory_stats()
    else:
        m["memory/max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if stats is not None:
        m.update(stats.collect())
    return m
