"""Parameter, FLOP and memory arithmetic from the config alone (nothing is allocated).

Counts follow the model megatron-core builds: untied embedding and output layer over the padded
vocabulary, fused QKV with grouped-query attention, SwiGLU (three d_ff x hidden matrices per MLP),
RMSNorm weights, a router per MoE layer, no biases.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.config.derived import moe_layer_pattern, padded_vocab, pipeline_stage_layers
from megatron_ext.config.schema import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig


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


def count_params(m: ModelConfig, moe: MoEConfig) -> ParamCounts:
    H, F, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    head_dim = H // m.num_attention_heads
    kv = m.num_kv_heads or m.num_attention_heads
    V = padded_vocab(m)
    emb = 2 * V * H  # untied input embedding + output layer
    attn = L * (H * (m.num_attention_heads + 2 * kv) * head_dim
                + m.num_attention_heads * head_dim * H)
    norms = L * 2 * H + H
    pattern = moe_layer_pattern(m, moe)
    n_moe = sum(pattern)
    n_dense = L - n_moe
    mlp = 3 * H * F
    E, k = moe.num_experts, moe.top_k
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


def flops_per_token(m: ModelConfig, moe: MoEConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x matmul params touched (LM head included) + attention scores.

    The attention term is 12 x layers x hidden x seq (forward QK^T and AV, times 3 for backward),
    the convention used in the project's benchmarks (REFERENCE section 5).
    """
    return matmul_flops_per_token(m, moe) + attention_flops_per_token(m, seq_length)


def matmul_flops_per_token(m: ModelConfig, moe: MoEConfig) -> float:
    """6 x the matmul parameters a token touches (forward 2, backward 4), the LM head included."""
    c = count_params(m, moe)
    return 6.0 * (c.active - c.norms - c.embedding // 2)  # the input embedding is a lookup


def attention_flops_per_token(m: ModelConfig, seq_length: int) -> float:
    """QK^T and AV for every position of the sequence, forward and backward (12 L h s)."""
    return 12.0 * m.num_layers * m.hidden_size * seq_length


def memory_estimate_gb(cfg: Config, world_size: int, bf16: bool = True) -> dict[str, float]:
    """Rough per-GPU memory of the fullest pipeline stage (the first holds the embedding and the
    most micro-batches in flight, the last the LM head and its logits): weights, grads, optimizer
    state (sharded if distributed), activations. Takes the root config: it reads the model, MoE,
    parallel, train and data sections (also for the planner's hypothetical layouts)."""
    last = cfg.parallel.pipeline - 1
    stages = [_stage_memory(cfg, world_size, bf16, stage) for stage in sorted({0, last})]
    return max(stages, key=lambda mem: mem["total"])


def _stage_memory(cfg: Config, world_size: int, bf16: bool, stage: int) -> dict[str, float]:
    c = count_params(cfg.model, cfg.moe)
    par, m = cfg.parallel, cfg.model
    p = par.pipeline
    dp = max(1, world_size // (par.tensor * p))
    n_layers = pipeline_stage_layers(par, m.num_layers)[stage]
    share = n_layers / m.num_layers
    # Layer parameters split by the stage's share of layers; each embedding table on its stage.
    table = c.embedding // 2
    layers_shared = c.total - c.experts_total - c.embedding
    shared = (layers_shared * share + table * ((stage == 0) + (stage == p - 1)))
    # Expert weights are split over expert-parallel ranks, everything over tensor parallelism.
    per_rank = shared / par.tensor + c.experts_total * share / (par.tensor * par.expert)
    w_bytes = 2 if bf16 else 4
    weights = per_rank * w_bytes
    grads = per_rank * 4  # megatron DDP accumulates grads in fp32 by default
    distributed = par.distributed_optimizer if par.distributed_optimizer is not None else True
    opt_shards = dp if distributed else 1
    optim = per_rank * (4 + 4 + (4 if bf16 else 0)) / opt_shards  # Adam m, v (+ fp32 master)
    s, b = cfg.data.seq_length, cfg.train.micro_batch_size
    # Per-layer activations kept for backward, ~34*s*b*h bytes (bf16, flash attention, no
    # recompute; Korthikanti et al. 2022) with MoE layers holding top_k copies of the MLP part.
    k = cfg.moe.top_k if cfg.moe.num_experts else 1
    act_layer = s * b * m.hidden_size * (18 + 16 * k) * (w_bytes / 2) / par.tensor
    if cfg.train.recompute == "full":
        # Each layer keeps its input; backward rebuilds one layer's activations at a time.
        layers = n_layers * s * b * m.hidden_size * w_bytes / par.tensor
    else:  # selective recompute is not modelled: an upper bound
        layers = n_layers * act_layer
    layers = layers * in_flight(par, cfg.train, world_size, stage)
    layers += act_layer if cfg.train.recompute == "full" else 0
    # Logits for the loss (last stage, one micro-batch at a time): the fused loss keeps them in
    # the model dtype; megatron's path adds an fp32 copy (docs/benchmarks.md, LM head + loss).
    logit_bytes = w_bytes if cfg.model.lm_loss == "fused" else w_bytes + 4
    logits = s * b * padded_vocab(m) * logit_bytes / par.tensor if stage == p - 1 else 0.0
    acts = layers + logits
    gb = 1024**3
    return {"weights": weights / gb, "grads": grads / gb, "optimizer": optim / gb,
            "activations": acts / gb, "total": (weights + grads + optim + acts) / gb}


def in_flight(par: ParallelConfig, tr: TrainConfig, world_size: int, stage: int) -> float:
    """Micro-batches whose activations pipeline stage ``stage`` holds at once: 1F1B's warm-up
    leaves ``pipeline - stage`` of them (at most the micro-batches of a step); the interleaved
    schedule holds ``1 + (p - 1) / (p v)`` times more of its (v times smaller) chunks on the
    first stage (Narayanan et al. 2021)."""
    p, v = par.pipeline, par.virtual_pipeline or 1
    if p == 1:
        return 1.0
    dp = max(1, world_size // (par.tensor * p))
    micro = max(1, tr.global_batch_size // (tr.micro_batch_size * dp))
    held = min(p - stage, micro)
    return held * (1 + (p - 1) / (p * v)) if v > 1 else float(held)
