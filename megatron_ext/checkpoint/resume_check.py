"""What a rerun on an existing ``checkpoint.save`` does: resume, refuse, or say it is finished.

The config a run is started with is compared with the ``config.yaml`` saved in the checkpoint it
would resume, field by field, under ONE policy table (``POLICY``):

- ``arch``: the checkpoint's tensors cannot be loaded into the configured model; always refused;
- ``run``: the checkpoint loads, but continuing would silently become a different run (another
  objective, optimizer, data stream, batch or length); refused with every differing field listed,
  unless ``checkpoint.allow_config_change: true``, which logs them as a warning instead;
- ``free``: how the run is observed, saved, laid out or computed, not what it computes.

A resumed run whose newest checkpoint already reached the configured total steps has nothing
to do: ``complete_message`` says so and the caller exits 0 without building anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_ext.checkpoint.store import CheckpointError, find_resumable, saved_config, verify
from megatron_ext.config.loader import to_dict
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import total_steps

ARCH, RUN, FREE = "arch", "run", "free"

# Longest matching dotted prefix wins; a field no entry covers counts as ``run`` (a new field is
# refused until someone decides it is harmless).
POLICY: dict[str, str] = {
    # Tensor shapes: a checkpoint of another shape cannot be loaded.
    "model.num_layers": ARCH, "model.hidden_size": ARCH, "model.num_attention_heads": ARCH,
    "model.num_kv_heads": ARCH, "model.ffn_hidden_size": ARCH, "model.vocab_size": ARCH,
    "model.vocab_multiple": ARCH, "moe.num_experts": ARCH, "moe.layer_freq": ARCH,
    # Everything else about the model and routing changes what is computed (RoPE base, norm eps,
    # top-k, capacity, loss coefficients) ...
    "model": RUN, "moe": RUN,
    # ... except implementation choices that compute the same function (flash/SDPA/TE attention,
    # the fused loss head, torch.compile'd kernels, dispatcher and grouped-GEMM experts are
    # interchangeable and checkpoint-compatible).
    "model.attention_backend": FREE, "model.lm_loss": FREE, "model.kernel_fusion": FREE,
    "moe.token_dispatcher": FREE, "moe.grouped_gemm": FREE,
    # The layout: a resume reshards the model and the optimizer state.
    "parallel": FREE,
    "optimizer": RUN, "schedule": RUN, "data": RUN, "upcycling": RUN,
    "data.valid_sets": FREE,  # what is evaluated, not what is trained
    "data.cache_dir": FREE,  # where index caches go; the indices are the same
    # train: batch, length, seed and precision change the run; the rest is observation,
    # recomputation, capture or failure policy. micro_batch_size only splits the same global
    # batch into another number of accumulation steps (like the data-parallel size does).
    "train": RUN,
    "train.micro_batch_size": FREE, "train.log_interval": FREE, "train.eval_interval": FREE,
    "train.eval_iters": FREE, "train.max_skipped_steps": FREE, "train.peak_tflops": FREE,
    "train.recompute": FREE, "train.recompute_modules": FREE, "train.cuda_graph": FREE,
    "train.deterministic": FREE,
    "checkpoint": FREE, "logging": FREE, "eval": FREE,
    "cluster": FREE,  # the machines --plan assumes; training never reads it
}


def policy(field: str) -> str:
    parts = field.split(".")
    for n in range(len(parts), 0, -1):
        rule = POLICY.get(".".join(parts[:n]))
        if rule is not None:
            return rule
    return RUN


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differences(saved: dict, current: dict) -> dict[str, list[tuple[str, Any, Any]]]:
    """``{policy: [(field, checkpoint value, config value), ...]}`` for fields that differ.

    A field missing from an older checkpoint's config is compared as its default (what that
    run used, since the field did not exist then)."""
    old, new = _flatten(to_dict(Config())), _flatten(current)
    old.update(_flatten(saved))
    out: dict[str, list] = {ARCH: [], RUN: [], FREE: []}
    for field in new:
        if old.get(field) != new[field]:
            out[policy(field)].append((field, old.get(field), new[field]))
    return out


def check_resume(path: Path, cfg: Config) -> list[str]:
    """Refuse (CheckpointError) a resume of ``path`` that would change the run; returns warnings.

    Architecture changes are refused always, other run-changing fields unless
    ``checkpoint.allow_config_change``, which turns them into one warning."""
    saved = saved_config(path)
    diffs = differences(saved, to_dict(cfg))
    if diffs[ARCH]:
        fields = ", ".join(f"{f} (checkpoint {a!r}, config {b!r})" for f, a, b in diffs[ARCH])
        raise CheckpointError(f"{path} is incompatible with this config: {fields}")
    if not diffs[RUN]:
        return []
    fields = "; ".join(f"{f}: checkpoint {a!r}, config {b!r}" for f, a, b in diffs[RUN])
    if not cfg.checkpoint.allow_config_change:
        raise CheckpointError(
            f"resuming {path} with a config that changes the run: {fields} (use the checkpoint's "
            f"config, another checkpoint.save, or --set checkpoint.allow_config_change=true)")
    return [f"resuming {path} with config changes (checkpoint.allow_config_change): {fields}"]


def complete_message(path: Path, cfg: Config) -> str | None:
    """The line to print when ``path`` already holds the run's last step, else None."""
    step, total = int(verify(path)["step"]), total_steps(cfg)
    if step < total:
        return None
    return f"run already complete: step {step} of {total} in {path}; nothing to do"


def preflight(cfg: Config) -> tuple[str | None, list[str]]:
    """Before anything is built: check the resume of ``checkpoint.save``.

    Returns (the "already complete" line or None, warnings); raises CheckpointError when the
    checkpoints are unusable or the config may not resume them."""
    if not cfg.checkpoint.save:
        return None, []
    resume, _ = find_resumable(cfg.checkpoint.save)  # its warnings are printed when it loads
    if resume is None:
        return None, []
    warnings = check_resume(resume, cfg)
    return complete_message(resume, cfg), warnings
