"""Step time of one layout, from the config alone: compute, communication volumes, pipeline.

Every assumption is a named constant in this file's first block, so docs/scaling.md can list
them and a measurement can replace them. Units: bytes, FLOPs, seconds.

Compute (per GPU, per micro-batch, forward + backward):
  GEMMs     6 x matmul params per token (``params.matmul_flops_per_token``, the FLOPs the
            throughput callback's MFU counts) / (peak x EFF_GEMM)
  attention FlashAttention's FLOPs: causal (half the scores) and a backward that recomputes
            QK^T, 2.5x the forward, so 3.5 x 2 s h per token per layer / (peak x EFF_ATTN)
  memory-bound passes (norms, RoPE, SwiGLU, dispatch, the loss's softmax over the vocabulary)
            bytes / HBM bandwidth, in passes over [tokens, hidden], [tokens x k, d_ff] and
            [tokens, vocab] bf16 tensors
  per-kernel device overhead, and eager steps' host launch time (a captured CUDA graph has none)
Communication (ring collectives: reduce-scatter / all-gather move (n-1)/n of the buffer per
rank, all-reduce twice that; an all-to-all sends (n-1)/n of it):
  TP  (sequence parallel) per layer and micro-batch, forward and backward: all-gather +
      reduce-scatter of [s b / tp, h] around attention and the MLP
  EP  per MoE layer and micro-batch: dispatch + combine all-to-all of the top_k copies of the
      rank's tokens, forward and backward
  DP  per step: fp32 gradient reduce-scatter + bf16 parameter all-gather (distributed
      optimizer) or fp32 all-reduce; dense parameters over the data-parallel group, expert
      parameters over the expert-data-parallel group (dp / ep ranks)
  PP  per micro-batch and stage boundary: [s / tp, b, h] bf16 forward, its gradient backward;
      the 1F1B bubble (p - 1) / m of the step, (p - 1) / (m v) interleaved
A group runs over NVLink when its ranks share a node, else over InfiniBand. Ranks are ordered as
megatron-core's ``initialize_model_parallel(order="tp-cp-ep-dp-pp")``: TP fastest, then EP
within DP, then PP, so a group of stride ``st`` and size ``n`` spans ``st x n`` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.config.derived import padded_vocab, pipeline_stage_layers
from megatron_ext.config.schema import ClusterConfig, Config
from megatron_ext.model.params import (
    attention_flops_per_token,
    count_params,
    matmul_flops_per_token,
)

# --- calibration (docs/benchmarks.md, one H100, issue 7; fitted as docs/scaling.md says) ---
EFF_GEMM = 0.60  # share of peak the GEMMs reach (profile: expert GEMMs 61%, LM head 69%)
EFF_ATTN = 0.38  # cuDNN flash attention, forward + backward, on FlashAttention's FLOPs (profile)
PASSES_HIDDEN = 250.0  # bf16 passes over [tokens, hidden] per layer: norms, RoPE, residuals,
# dispatch permute/unpermute, copies, fp32 intermediates (fitted: the profile's remainder)
PASSES_FFN = 7.0  # bf16 passes over [tokens x top_k, d_ff] per MoE/MLP layer (SwiGLU, fwd+bwd)
PASSES_VOCAB = 12.0  # bf16 passes over [tokens, vocab] (the fused loss's chunked softmax)
KERNEL_S_PER_LAYER = 0.6e-3  # device time per layer and micro-batch not proportional to size
HOST_S_PER_LAYER = 6.0e-3  # eager steps: host time to launch one layer's ~150 kernels
HOST_S_FIXED = 16.0e-3  # eager steps, per micro-batch: embedding and loss launches (and, in
# the benchmark's one-micro-batch steps, the optimizer's)
HOST_LEAK = 0.25  # eager steps: share of the host time the device idles even when it is behind
RECOMPUTE_FULL_EXTRA = 1 / 3  # train.recompute: full repeats the forward (1 of 3 GEMM passes)
ADAM_BYTES_PER_PARAM = 30.0  # training loop: fp32 grad + master, m, v read/written, bf16 copy
# --- overlap: what part of each communication the step waits for ---
DP_EXPOSED = 1.0  # training/setup.py: overlap_grad_reduce=False, no param-gather overlap
EP_EXPOSED = 1.0  # all-to-alls sit between the router and the experts (no overlap)
TP_EXPOSED = 1.0  # sequence-parallel gathers sit before each GEMM (no overlap)
PP_EXPOSED = 1.0  # megatron's p2p is blocking between 1F1B steps
# --- bytes per element ---
ACT_BYTES = 2  # bf16 activations, all-to-all payloads and pipeline messages
GRAD_BYTES = 4  # DDP grad_reduce_in_fp32=True (training/setup.py)
PARAM_BYTES = 2  # bf16 parameters gathered by the distributed optimizer (fp32 runs: 4)


@dataclass(frozen=True)
class Layout:
    """One candidate: the parallel sizes and batch split a config copy was set to."""

    tensor: int
    pipeline: int
    expert: int
    data: int
    micro_batch: int
    micro_batches: int  # per step on each data-parallel rank
    distributed_optimizer: bool
    cuda_graph: bool
    virtual_pipeline: int

    @classmethod
    def of(cls, cfg: Config, world: int) -> Layout:
        par, tr = cfg.parallel, cfg.train
        dp = world // (par.tensor * par.pipeline)
        dist = par.distributed_optimizer if par.distributed_optimizer is not None else True
        return cls(par.tensor, par.pipeline, par.expert, dp, tr.micro_batch_size,
                   tr.global_batch_size // (tr.micro_batch_size * dp), dist,
                   tr.cuda_graph, par.virtual_pipeline or 1)


def compute_time(cfg: Config, cl: ClusterConfig, lay: Layout, layers: int, head: bool) -> float:
    """One micro-batch, forward + backward, of ``layers`` layers (+ the LM head and loss)."""
    m, moe = cfg.model, cfg.moe
    L, H = m.num_layers, m.hidden_size
    tokens = cfg.data.seq_length * lay.micro_batch
    V = padded_vocab(m)
    head_flops = 6.0 * V * H
    layer_flops = (matmul_flops_per_token(m, moe) - head_flops) / L
    gemm = tokens * (layers * layer_flops + head * head_flops) / lay.tensor
    # attention_flops_per_token is 12 L h s: 3 x the forward's 4 h s per token and layer.
    # FlashAttention computes the causal half (2 h s) forward and 2.5x that backward.
    attn_flops = attention_flops_per_token(m, cfg.data.seq_length)
    attn = tokens * layers * 7.0 / 12.0 * attn_flops / L / lay.tensor
    peak = cl.peak_tflops * 1e12
    k = moe.top_k if moe.num_experts else 1
    per_byte = tokens * ACT_BYTES / lay.tensor / (cl.hbm_gbs * 1e9)
    layer_passes = (PASSES_HIDDEN * H + PASSES_FFN * k * m.ffn_hidden_size) * layers * per_byte
    head_passes = PASSES_VOCAB * V * head * per_byte
    layer_gemm = tokens * layers * layer_flops / lay.tensor
    # Full recomputation runs each layer's forward (a third of its forward + backward) twice;
    # selective recomputation is not modelled (its recomputed parts are small, memory-bound).
    again = RECOMPUTE_FULL_EXTRA if cfg.train.recompute == "full" else 0.0
    device = (gemm + again * layer_gemm) / (peak * EFF_GEMM) + head_passes
    device += (1 + again) * (attn / (peak * EFF_ATTN) + layer_passes + KERNEL_S_PER_LAYER * layers)
    if lay.cuda_graph:
        return device
    host = HOST_S_PER_LAYER * layers + HOST_S_FIXED
    return max(device, host) + HOST_LEAK * host


def rank_params(cfg: Config, lay: Layout) -> tuple[float, float]:
    """(dense, expert) parameters one rank of the largest stage holds."""
    c = count_params(cfg.model, cfg.moe)
    share = max(pipeline_stage_layers(cfg.parallel, cfg.model.num_layers)) / cfg.model.num_layers
    tables = c.embedding / min(lay.pipeline, 2)  # both tables on one stage, or one on each end
    # Norms and routers are whole on every tensor-parallel rank (sequence-parallel weights).
    whole = (c.norms + c.router) * share
    split = (c.total - c.experts_total - c.embedding) * share - whole + tables
    return split / lay.tensor + whole, c.experts_total * share / (lay.tensor * lay.expert)


def optimizer_time(cfg: Config, cl: ClusterConfig, lay: Layout,
                   adam_bytes: float = ADAM_BYTES_PER_PARAM) -> float:
    """The Adam update: memory-bound over this rank's (shard of the) parameters."""
    dense, experts = rank_params(cfg, lay)
    shards = lay.data if lay.distributed_optimizer else 1
    expert_shards = max(1, lay.data // lay.expert) if lay.distributed_optimizer else 1
    params = dense / shards + experts / expert_shards
    return params * adam_bytes / (cl.hbm_gbs * 1e9)
