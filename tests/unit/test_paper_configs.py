"""The paper configs keep the paper stack's training semantics (docs/fidelity.md).

Facts from the published runs' job scripts (Taishi-N324/Drop-Upcycling scripts/pretrain/moe/,
moe-recipes v1.0.0 at commit 0860594) and the upcycled models' config.json (transformers
4.42.4): a field that drifts from them fails here, naming the config, the field and both
values. Settings that are ours to choose (parallel layout, micro-batch size, CUDA graphs,
checkpointing, logging) are not listed.
"""

from __future__ import annotations

import pytest

from megatron_ext.config.derived import total_steps
from megatron_ext.config.loader import load_config
from megatron_ext.training.optim import clip_threshold

# Every paper run: transformers' Mixtral with output_router_logits, router_aux_loss_coef 0.02,
# torch.optim.AdamW(model.parameters(), betas (0.9, 0.95), eps 1e-8, weight_decay 0.1),
# DeepSpeed gradient_clipping 1, WarmupCosineAnnealingLR (warmup 2000 from min_lr, cosine to
# min_lr over the whole run), seq 4096, seed 1234 (moe-recipes' default), split 998,1,1.
COMMON = {
    "moe.num_experts": 8, "moe.top_k": 2, "moe.aux_loss_coeff": 0.02,
    "moe.aux_loss_scope": "all_layers", "moe.z_loss_coeff": None, "moe.capacity_factor": None,
    "moe.layer_freq": 1,
    "model.norm_epsilon": 1e-5, "model.rotary_base": 10000.0, "model.max_position_embeddings": 4096,
    "optimizer.lr": 2e-4, "optimizer.min_lr": 2e-5, "optimizer.weight_decay": 0.1,
    "optimizer.weight_decay_scope": "all", "optimizer.adam_beta1": 0.9,
    "optimizer.adam_beta2": 0.95, "optimizer.adam_eps": 1e-8, "optimizer.clip_grad": 1.0,
    "schedule.warmup_steps": 2000, "schedule.warmup_init_lr": None,  # None = from min_lr
    "schedule.decay_style": "cosine", "schedule.decay_steps": None,  # None = the whole run
    "data.seq_length": 4096, "data.split": "998,1,1", "train.seed": 1234,
    "train.train_tokens": 500_000_000_000,
}
# Per run: the shape (paper Table), the global batch, and the gradient accumulation steps the
# paper's stack divided by a second time (global batch / (micro-batch x GPUs) in the scripts:
# 512 / (8 x 8), 1024 / (16 x 32), 1024 / (8 x 64)).
PER_RUN = {
    "8x152M": {"model.num_layers": 12, "model.hidden_size": 512, "model.num_attention_heads": 8,
               "model.num_kv_heads": 8, "model.ffn_hidden_size": 2048, "model.vocab_size": 99584,
               "train.global_batch_size": 512, "optimizer.grad_divisor": 8.0},
    "8x1.5B": {"model.num_layers": 24, "model.hidden_size": 2048, "model.num_attention_heads": 16,
               "model.num_kv_heads": 8, "model.ffn_hidden_size": 7168, "model.vocab_size": 48640,
               "train.global_batch_size": 1024, "optimizer.grad_divisor": 2.0},
    "8x3.7B": {"model.num_layers": 28, "model.hidden_size": 3072, "model.num_attention_heads": 24,
               "model.num_kv_heads": 24, "model.ffn_hidden_size": 8192, "model.vocab_size": 99584,
               "train.global_batch_size": 1024, "optimizer.grad_divisor": 2.0},
}
STEPS = {"8x152M": 238419, "8x1.5B": 119210, "8x3.7B": 119210}  # the scripts' TRAIN_STEPS


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def drift(paper: str, *sets: str) -> list[str]:
    cfg = load_config(f"configs/{paper}.yaml", list(sets))
    return [f"{k}: {_get(cfg, k)!r} (paper: {v!r})" for k, v in {**COMMON, **PER_RUN[paper]}.items()
            if _get(cfg, k) != v]


@pytest.mark.parametrize("paper", sorted(PER_RUN))
def test_paper_config_keeps_the_paper_semantics(paper):
    found = drift(paper)
    assert not found, f"configs/{paper}.yaml drifted from the paper's stack: " + "; ".join(found)
    cfg = load_config(f"configs/{paper}.yaml", [])
    assert total_steps(cfg.train, cfg.data.seq_length) == STEPS[paper]
    # The derived semantics: clipping at the paper's threshold in mean-gradient units.
    assert clip_threshold(cfg) == 1.0 * PER_RUN[paper]["optimizer.grad_divisor"]


def test_the_table_catches_a_drift():
    assert drift("8x1.5B", "moe.aux_loss_scope=per_layer", "optimizer.grad_divisor=1") == [
        "moe.aux_loss_scope: 'per_layer' (paper: 'all_layers')",
        "optimizer.grad_divisor: 1.0 (paper: 2.0)"]
