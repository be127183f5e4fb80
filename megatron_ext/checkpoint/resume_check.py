"""What a rerun on an existing ``checkpoint.save`` does: resume, refuse, or say it is finished.

The config a run is started with is compared with the ``config.yaml`` saved in the checkpoint it
would resume, field by field, under the policy each field declares in ``config/schema.py``:

- ``arch``: the checkpoint's tensors cannot be loaded into the configured model; always refused;
- ``run``: the checkpoint loads, but continuing would silently become a different run (another
  objective, optimizer, data stream, batch or length); refused with every differing field listed,
  unless ``checkpoint.allow_config_change: true``, which logs them as a warning instead;
- ``free``: how the run is observed, saved, laid out or computed, not what it computes.

A resumed run whose newest checkpoint already reached the configured total steps has nothing
to do: ``complete_message`` says so and the caller exits 0 without building anything.
``checkpoint.load`` (initial weights) is held to the shape fields only: ``shape_problem``.
``plan.make_plan`` applies all of these, once per job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_ext.checkpoint.store import CheckpointError, saved_config, verify
from megatron_ext.config.fields import ARCH, FREE, RUN, leaves, short_repr
from megatron_ext.config.loader import to_dict
from megatron_ext.config.schema import Config

# Declared with each field in config/schema.py (``setting(..., resume=...)``, else the policy
# of its section). Longest matching dotted prefix wins (a mapping field's entries take its
# policy); a name no entry covers counts as ``run``.
POLICY: dict[str, str] = {leaf.name: leaf.resume or RUN for leaf in leaves(Config)}


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


def _shape_view(tree: dict) -> dict[str, Any]:
    """The ``arch`` fields of a config tree (defaults for those an older checkpoint lacks), in
    the form that fixes tensor shapes: ``num_kv_heads`` None means one per query head, and a
    dense model has no MoE layers to place."""
    flat = _flatten(to_dict(Config()))
    flat.update(_flatten(tree))
    arch = {name: flat.get(name) for name, rule in POLICY.items() if rule == ARCH}
    if arch.get("model.num_kv_heads") is None:
        arch["model.num_kv_heads"] = arch.get("model.num_attention_heads")
    if not arch.get("moe.num_experts"):
        arch.pop("moe.layer_freq", None)
    return arch


def compare_model_config(saved: dict, run: dict) -> list[str]:
    """``"field (checkpoint X, config Y)"`` for every field that fixes a tensor shape (the
    schema's ``arch`` fields) and differs between a checkpoint's saved config tree and the run's;
    [] when the checkpoint's tensors fit the configured model. Compared before anything is built,
    so a mismatch is one line naming every field, not megatron's shape error from the load."""
    old, new = _shape_view(saved), _shape_view(run)
    return [f"{name} (checkpoint {short_repr(old.get(name))}, config "
            f"{short_repr(new.get(name))})" for name in sorted(set(old) | set(new))
            if old.get(name) != new.get(name)]


def shape_problem(path: Path, cfg: Config) -> str | None:
    """The one line refusing to load ``path``'s tensors into ``cfg``'s model, or None."""
    fields = compare_model_config(saved_config(path), to_dict(cfg))
    if not fields:
        return None
    return (f"{path} does not fit the configured model (tensor shapes differ): "
            f"{', '.join(fields)}")


def check_resume(path: Path, cfg: Config) -> list[str]:
    """Refuse (CheckpointError) a resume of ``path`` that would change the run; returns warnings.

    Architecture changes are refused always, other run-changing fields unless
    ``checkpoint.allow_config_change``, which turns them into one warning."""
    saved = saved_config(path)
    shapes = compare_model_config(saved, to_dict(cfg))
    if shapes:
        raise CheckpointError(f"{path} is incompatible with this config: {', '.join(shapes)}")
    diffs = differences(saved, to_dict(cfg))
    if not diffs[RUN]:
        return []
    fields = "; ".join(f"{f}: checkpoint {short_repr(a)}, config {short_repr(b)}"
                      for f, a, b in diffs[RUN])
    if not cfg.checkpoint.allow_config_change:
        raise CheckpointError(
            f"resuming {path} with a config that changes the run: {fields} (use the checkpoint's "
            f"config, another checkpoint.save, or --set checkpoint.allow_config_change=true)")
    return [f"resuming {path} with config changes (checkpoint.allow_config_change): {fields}"]


def complete_message(path: Path, total: int, meta: dict | None = None) -> str | None:
    """The line to print when ``path`` (with manifest ``meta``, verified; None: verify it now)
    already holds the run's last step (``total``: the run's total steps), else None."""
    step = int((meta or verify(path))["step"])
    if step < total:
        return None
    return f"run already complete: step {step} of {total} in {path}; nothing to do"
