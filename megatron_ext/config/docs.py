"""Generate docs/config.md from the field docstrings in schema.py (``python -m
megatron_ext.config.docs > docs/config.md``); a test keeps the two in sync and checks that
every field has a docstring."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

from megatron_ext.config import schema
from megatron_ext.config.fields import leaves
from megatron_ext.config.ranges import describe


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right after each annotated field."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def sections() -> list[tuple[str, type]]:
    out = []

    def walk(prefix: str, cls: type) -> None:
        out.append((prefix, cls))
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                walk(f"{prefix}.{f.name}" if prefix else f.name, type(default))

    walk("", schema.Config)
    return out[1:]


# Megatron-LM's pretrain_gpt.py flags -> our fields, for a reader coming from its job scripts;
# render() refuses a field that does not exist, so a rename cannot leave this table behind.
MEGATRON_FLAGS = (
    ("--num-layers", "model.num_layers", ""),
    ("--hidden-size", "model.hidden_size", ""),
    ("--num-attention-heads", "model.num_attention_heads", ""),
    ("--group-query-attention --num-query-groups", "model.num_kv_heads", "None = as many as heads"),
    ("--ffn-hidden-size", "model.ffn_hidden_size", ""),
    ("--vocab-size", "model.vocab_size", "the tokenizer's vocabulary, before padding"),
    ("--make-vocab-size-divisible-by", "model.vocab_multiple",
     "Megatron also multiplies it by the tensor-parallel size; ours is the final multiple"),
    ("--max-position-embeddings", "model.max_position_embeddings", ""),
    ("--rotary-base", "model.rotary_base", "RoPE is always on (--position-embedding-type rope)"),
    ("--norm-epsilon", "model.norm_epsilon",
     "RMSNorm, SwiGLU, no biases, untied embeddings are fixed (--normalization RMSNorm --swiglu "
     "--disable-bias-linear --untie-embeddings-and-output-weights)"),
    ("--init-method-std", "model.init_method_std", ""),
    ("--attention-backend", "model.attention_backend", "values: auto, te, flash, sdpa, unfused"),
    ("--num-experts", "moe.num_experts", ""),
    ("--moe-router-topk", "moe.top_k", ""),
    ("--moe-aux-loss-coeff", "moe.aux_loss_coeff",
     "moe.aux_loss_scope: all_layers is the paper stack's loss, per_layer is Megatron's"),
    ("--moe-z-loss-coeff", "moe.z_loss_coeff", ""),
    ("--moe-layer-freq", "moe.layer_freq", ""),
    ("--moe-token-dispatcher-type", "moe.token_dispatcher", ""),
    ("--moe-grouped-gemm", "moe.grouped_gemm", ""),
    ("--moe-expert-capacity-factor", "moe.capacity_factor", ""),
    ("--moe-token-drop-policy", "moe.token_drop_policy", ""),
    ("--moe-pad-expert-input-to-capacity", "moe.pad_to_capacity", ""),
    ("--tensor-model-parallel-size", "parallel.tensor", ""),
    ("--pipeline-model-parallel-size", "parallel.pipeline", ""),
    ("--expert-model-parallel-size", "parallel.expert", ""),
    ("--sequence-parallel", "parallel.sequence_parallel", ""),
    ("--use-distributed-optimizer", "parallel.distributed_optimizer", ""),
    ("--decoder-first-pipeline-num-layers", "parallel.first_stage_layers", ""),
    ("--decoder-last-pipeline-num-layers", "parallel.last_stage_layers", ""),
    ("--lr", "optimizer.lr", ""),
    ("--min-lr", "optimizer.min_lr", ""),
    ("--weight-decay", "optimizer.weight_decay",
     "optimizer.weight_decay_scope: all decays norms too (the paper's torch AdamW)"),
    ("--adam-beta1, --adam-beta2, --adam-eps", "optimizer.adam_beta1, adam_beta2, adam_eps", ""),
    ("--clip-grad", "optimizer.clip_grad", ""),
    ("--lr-warmup-iters", "schedule.warmup_steps", ""),
    ("--lr-warmup-init", "schedule.warmup_init_lr", "None = from min_lr, as the paper's stack"),
    ("--lr-decay-style", "schedule.decay_style", ""),
    ("--lr-decay-iters", "schedule.decay_steps", "None = the whole run"),
    ("--global-batch-size", "train.global_batch_size", "sequences"),
    ("--micro-batch-size", "train.micro_batch_size", ""),
    ("--train-iters", "train.train_steps", ""),
    ("--train-samples", "train.train_tokens", "tokens, not samples: samples x data.seq_length"),
    ("--seed", "train.seed", ""),
    ("--bf16", "train.precision", "bf16 (fp32 otherwise; auto = bf16 on GPUs)"),
    ("--recompute-granularity", "train.recompute", ""),
    ("--recompute-modules", "train.recompute_modules", ""),
    ("--log-interval", "train.log_interval", ""),
    ("--eval-interval", "train.eval_interval", ""),
    ("--eval-iters", "train.eval_iters", ""),
    ("--data-path", "data.blend", "the same [weight, prefix, ...] list"),
    ("--split", "data.split", ""),
    ("--seq-length", "data.seq_length", ""),
    ("--tokenizer-model", "data.tokenizer", "the tokenizer type is read from the file"),
    ("--mock-data", "data.mock", ""),
    ("--data-cache-path", "data.cache_dir", ""),
    ("--save", "checkpoint.save", "a run with checkpoints there resumes from them"),
    ("--load", "checkpoint.load",
     "initial weights only, optimizer fresh (Megatron's --load with --no-load-optim "
     "--no-load-rng --finetune); resuming is checkpoint.save's"),
    ("--save-interval", "checkpoint.save_interval", ""),
    ("--async-save", "checkpoint.async_save", ""),
    ("--exit-signal-handler", "", "always on: SIGUSR1 checkpoints and stops (the SLURM "
     "launcher then requeues)"),
    ("--tensorboard-dir", "logging.tensorboard", "written under logging.output_dir"),
    ("--wandb-project, --wandb-exp-name", "logging.wandb.project, logging.wandb.name", ""),
)


def megatron_table() -> list[str]:
    """The Megatron-LM flag table, every field in it checked against the schema."""
    known = {leaf.name for leaf in leaves(schema.Config)}
    lines = ["## From Megatron-LM's flags", "",
             "Megatron-LM's `pretrain_gpt.py` flags and the fields that do their work here "
             "(`--set field=value`, or the YAML).", "",
             "| Megatron-LM | field | note |", "|---|---|---|"]
    for flag, fields, note in MEGATRON_FLAGS:
        names = [f.strip() for f in fields.split(",") if f.strip()]
        section = names[0].rsplit(".", 1)[0] if names else ""
        for name in names:
            full = name if "." in name else f"{section}.{name}"
            if full not in known:
                raise KeyError(f"MEGATRON_FLAGS names {full}, which is not a config field")
        shown = ", ".join(f"`{n}`" for n in names)
        lines.append(f"| `{flag}` | {shown} | {note} |")
    return [*lines, ""]


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `megatron_ext/config/schema.py` by "
             "`python -m megatron_ext.config.docs`. Override any field with "
             "`--set section.key=value` (YAML syntax). *resume*: what a rerun on an existing "
             "`checkpoint.save` does when the field changed -- `arch`: refused (the tensors "
             "do not fit), `run`: refused unless `checkpoint.allow_config_change`, `free`: "
             "allowed.", ""]
    resume = {leaf.name: leaf.resume for leaf in leaves(schema.Config)}
    for name, cls in sections():
        docs = field_docs(cls)
        lines += [f"## `{name}`", "", "| field | default | range | resume | meaning |",
                  "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if dataclasses.is_dataclass(default):
                    continue
            else:
                default = f.default
            bounds = describe(f"{name}.{f.name}") or _choices(typing.get_type_hints(cls)[f.name])
            lines.append(f"| `{f.name}` | `{default!r}` | {f'`{bounds}`' if bounds else ''} | "
                         f"{resume[f'{name}.{f.name}']} | {docs.get(f.name, '')} |")
        lines.append("")
    lines += megatron_table()
    return "\n".join(lines)


def _choices(tp: type) -> str:
    """'one of a, b' for a Literal field ('' otherwise)."""
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    return ""


if __name__ == "__main__":
    print(render(), end="")
