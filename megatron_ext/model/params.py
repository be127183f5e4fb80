"""Parameter, FLOP and memory arithmetic from the config alone (nothing is allocated).

Counts follow the model megatron-core builds: untied embedding and output layer over the padded
vocabulary, fused QKV with grouped-query attention, SwiGLU (three d_ff x hidden matrices per MLP),
RMSNorm weights, a router per MoE layer, no biases.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.config.schema import Config
from megatron_ext.config.validate import moe_layer_pattern


def padded_vocab(cfg: Config) -> int:
    """Vocabulary rows of the embedding/output layer. Not scaled by the tensor-parallel size (as
    megatron's training script does) so a checkpoint loads at any TP; validation checks that
    ``vocab_multiple`` splits evenly over TP ranks."""
    mult = cfg.model.vocab_multiple
    return -(-cfg.model.vocab_size // mult) * mult


@dataclass
class ParamCounts:
    total: int
    active: int
    embedding: int
    attention: int
    experts_total: int
    experts_active: int
    dense_mlp: int
    router: int
    norms: int
    moe_layers: int


def count_params(cfg: Config) -> ParamCounts:
    m = cfg.model
    H, F, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    head_dim = H // m.num_attention_heads
    kv = m.num_kv_heads or m.num_attention_heads
    V = padded_vocab(cfg)
    emb = 2 * V * H  # untied input embedding + output layer
    attn = L * (H * (m.num_attention_heads + 2 * kv) * head_dim
                + m.num_attention_heads * head_dim * H)
    norms = L * 2 * H + H
    pattern = moe_layer_pattern(cfg)
    n_moe = sum(pattern)
    n_dense = L - n_moe
    mlp = 3 * H * F
    E, k = cfg.moe.num_experts, cfg.moe.top_k
    experts_total = n_moe * E * mlp
    experts_active = n_moe * k * mlp
    router = n_moe * E * H
    dense = n_dense * mlp
    shared = emb + attn + norms + dense + router
    return ParamCounts(
        total=shared + experts_total, active=shared + experts_active, embedding=emb,
        attention=attn, experts_total=experts_total, experts_active=experts_active,
        dense_mlp=dense, router=router, norms=norms, moe_layers=n_moe,
    )


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6 x matmul params touched (LM head included) + attention scores.

    The attention term is 12 x layers x hidden x seq (forward QK^T and AV, times 3 for backward),
    the convention used in the project's benchmarks (REFERENCE section 5).
    """
    c = count_params(cfg)
    matmul = c.active - c.norms - c.embedding // 2  # the input embedding is a lookup, not a matmul
    m = cfg.model
    return 6.0 * matmul + 12.0 * m.num_layers * m.hidden_size * cfg.data.seq_length


def memory_estimate_gb(cfg: Config, world_size: int, bf16: bool = True) -> dict[str, float]:
    """Rough per-GPU memory: weights, grads, optimizer state (sharded if distributed),
    activations."""
    c = count_params(cfg)
    par = cfg.parallel
    dp = max(1, world_size // (par.tensor * par.pipeline))
    # Expert weights are split over expert-parallel ranks, everything over tensor parallelism.
    per_rank = ((c.total - c.experts_total) / par.tensor
                + c.experts_total / (par.tensor * par.expert))
    w_bytes = 2 if bf16 else 4
    weights = per_rank * w_bytes
    grads = per_rank * 4  # megatron DDP accumulates grads in fp32 by default
    distributed = par.distributed_optimizer if par.distributed_optimizer is not None else True
    opt_shards = dp if distributed else 1
    optim = per_rank * (4 + 4 + (4 if bf16 else 0)) / opt_shards  # Adam m, v (+ fp32 master)
    m = cfg.model
    s, b = cfg.data.seq_length, cfg.train.micro_batch_size
    # Per-layer activations kept for backward, ~34*s*b*h bytes (bf16, flash attention, no
    # recompute; Korthikanti et al. 2022) with MoE layers holding top_k copies of the MLP part.
    k = cfg.moe.top_k if cfg.moe.num_experts else 1
    act_layer = s * b * m.hidden_size * (18 + 16 * k) * (w_bytes / 2) / par.tensor
    if cfg.train.recompute == "full":
        # Each layer keeps its input; backward rebuilds one layer's activations at a time.
        layers = m.num_layers * s * b * m.hidden_size * w_bytes / par.tensor + act_layer
    else:  # selective recompute is not modelled: an upper bound
        layers = m.num_layers * act_layer
    # Logits for the loss: the fused loss keeps them in the model dtype; megatron's path adds an
    # fp32 copy (docs/benchmarks.md, LM head + loss memory).
    logit_bytes = w_bytes if cfg.model.lm_loss == "fused" else w_bytes + 4
    logits = s * b * padded_vocab(cfg) * logit_bytes / par.tensor
    acts = layers + logits
    gb = 1024**3
    return {"weights": weights / gb, "grads": grads / gb, "optimizer": optim / gb,
            "activations": acts / gb, "total": (weights + grads + optim + acts) / gb}
