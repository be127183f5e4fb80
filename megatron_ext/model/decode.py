"""A lean decoder for generation and scoring: the megatron model's forward in plain PyTorch, on
the model's own weights, with a KV cache of its own.

Why: a one-token decode step of a small model is all host time, and megatron-core's layers
spend most of theirs in Python around the math (on this project's CPU machine, per call:
``ColumnParallelLinear`` 45-90 us against 12 us for ``F.linear``, the router 60 us; see
docs/benchmarks.md, issue 27.3). Here a layer is a few dozen plain torch calls.

What it runs is exactly what ``model.builder`` builds with megatron's local spec in one process
(``unsupported`` says why a model is not, and ``model.inference`` then keeps megatron's path):
embedding; per layer RMSNorm, fused QKV in megatron's per-group layout ([q of the group's
N/K heads; k; v] per KV group, GQA), RoPE (non-interleaved, the model's ``inv_freq``, positions
= cache columns), SDPA over the cached keys, output projection, residual; RMSNorm, then a dense
SwiGLU MLP or a MoE layer (router in fp32: top-k of the logits then softmax over the k
(Mixtral), or softmax over all experts then top-k (pre-softmax, top-1); experts' SwiGLU scaled
by their probability, summed); final RMSNorm and the LM head. Weights are borrowed (the
parameters themselves and views of them, no copies), so a decoder built after a
``load_state_dict`` or an optimizer step sees the new values; ``LeanCache`` builds one per
cache for that reason.

Shape legend: B rows, S new columns, L cache columns, H hidden, N query heads, K KV heads,
R = N / K, D head dim, T = B x S tokens, E experts, V vocabulary (megatron-padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

from megatron_ext.model.attention import SDPAttention
from megatron_ext.model.experts import GroupedGemmExperts, TokenGroups, grouped_linear

# TransformerConfig fields and the only value the lean decoder implements.
_CONFIG = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
           "context_parallel_size": 1, "expert_model_parallel_size": 1,
           "sequence_parallel": False, "normalization": "RMSNorm", "gated_linear_unit": True,
           "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False,
           "rotary_interleaved": False, "multi_latent_attention": False, "fp8": None,
           "apply_residual_connection_post_layernorm": False, "fp32_residual_connection": False,
           "window_size": None, "moe_router_score_function": "softmax",
           "moe_router_num_groups": None, "moe_router_topk_scaling_factor": None,
           "moe_router_enable_expert_bias": False, "moe_input_jitter_eps": None,
           "moe_expert_capacity_factor": None, "moe_shared_expert_intermediate_size": None,
           "moe_apply_probs_on_input": False, "moe_router_force_load_balancing": False}


def _layer_problem(layer) -> str | None:
    attention = layer.self_attention
    if not (isinstance(layer.input_layernorm, torch.nn.RMSNorm)
            and isinstance(layer.pre_mlp_layernorm, torch.nn.RMSNorm)):
        return "its norms are not torch RMSNorm (Transformer Engine's spec?)"
    if not (type(attention.linear_qkv) is ColumnParallelLinear
            and type(attention.linear_proj) is RowParallelLinear):
        return "its attention projections are not megatron's local linears"
    if not isinstance(attention.core_attention, SDPAttention):
        return f"its core attention is {type(attention.core_attention).__name__}, not SDPA"
    if not all(isinstance(getattr(layer, name, None) or IdentityOp(), IdentityOp)
               for name in ("cross_attention", "pre_cross_attn_layernorm")):
        return "it has cross-attention"
    mlp = layer.mlp
    if isinstance(mlp, MoELayer):
        if not isinstance(mlp.router, TopKRouter) or mlp.shared_experts is not None:
            return "its MoE layer has another router or shared experts"
        if not isinstance(mlp.experts, GroupedGemmExperts | SequentialMLP):
            return f"its experts are {type(mlp.experts).__name__}"
    elif not (type(mlp) is MLP and type(mlp.linear_fc1) is ColumnParallelLinear):
        return f"its MLP is {type(mlp).__name__}"
    return None


def unsupported(model) -> str | None:
    """Why the lean decoder cannot run ``model`` (None: it can): anything but a whole
    single-process megatron GPTModel on the CPU of the architecture ``model.builder`` builds
    with the local spec."""
    if not isinstance(model, GPTModel):
        return f"not a megatron GPTModel ({type(model).__name__})"
    if not (model.pre_process and model.post_process) or getattr(model, "mtp_process", False):
        return "a pipeline stage or a multi-token-prediction model, not a whole model"
    if parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size() > 1
            or parallel_state.get_pipeline_model_parallel_world_size() > 1
            or parallel_state.get_expert_model_parallel_world_size() > 1):
        return "tensor, pipeline or expert parallelism"
    if next(model.parameters()).device.type != "cpu":
        return "not on the CPU (megatron's path there is free of host syncs)"
    config = model.config
    for name, value in _CONFIG.items():
        if getattr(config, name, value) != value:
            return f"config.{name} = {getattr(config, name)!r}"
    if config.activation_func is not F.silu or config.moe_router_dtype not in (None, "fp32"):
        return "an activation other than SwiGLU or a router dtype other than fp32"
    rope = getattr(model, "rotary_pos_emb", None)
    if (model.position_embedding_type != "rope" or type(rope) is not RotaryEmbedding
            or rope.seq_len_interpolation_factor is not None
            or 2 * rope.inv_freq.numel() != config.kv_channels):
        return "not plain RoPE over the whole head dimension"
    if not isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm):
        return "its final norm is not torch RMSNorm"
    for index, layer in enumerate(model.decoder.layers):
        if (problem := _layer_problem(layer)) is not None:
            return f"layer {index}: {problem}"
    return None


def attention_mask(pad_BL: torch.Tensor | None, start: int, s: int,
                   device: torch.device) -> torch.Tensor | None:
    """Mask (True = masked) of ``s`` new columns after ``start`` over columns 0..start+s:
    causal, and no padding key except a padding query's own column (so no query is left with
    nothing to attend to). None when there is no padding and no causal part (one new column)."""
    if pad_BL is None and s == 1:
        return None
    end = start + s
    keys_1K = torch.arange(end, device=device)[None, :]
    queries_S1 = torch.arange(start, end, device=device)[:, None]
    mask_SK = keys_1K > queries_S1
    if pad_BL is None:
        return mask_SK
    pad_B11K = pad_BL[:, None, None, :end].to(device)
    return mask_SK | (pad_B11K & (keys_1K != queries_S1))


@dataclass
class _Layer:
    norm1: torch.nn.RMSNorm
    qkv_GH: torch.Tensor  # G = K * (R + 2) * D rows: per KV group [q x R; k; v]
    proj_HN: torch.Tensor
    scale: float
    norm2: torch.nn.RMSNorm
    fc1: list[torch.Tensor]  # [2F, H] per expert ([gate; up]); one for a dense MLP
    fc2: list[torch.Tensor]  # [H, F] per expert
    router_EH: torch.Tensor | None  # None: dense
    top_k: int = 1
    pre_softmax: bool = False
    fc1_EGH: torch.Tensor | None = None  # the stacked expert weights (GroupedGemmExperts)
    fc2_EHF: torch.Tensor | None = None


def _borrow(layer) -> _Layer:
    attention, mlp = layer.self_attention, layer.mlp
    if isinstance(mlp, MoELayer):
        experts = mlp.experts
        stacked = (experts.fc1_weight, experts.fc2_weight) if isinstance(
            experts, GroupedGemmExperts) else (None, None)
        if stacked[0] is not None:
            fc1, fc2 = list(stacked[0].unbind(0)), list(stacked[1].unbind(0))
        else:
            fc1 = [e.linear_fc1.weight for e in experts.local_experts]
            fc2 = [e.linear_fc2.weight for e in experts.local_experts]
        router = mlp.router
        return _Layer(layer.input_layernorm, attention.linear_qkv.weight,
                      attention.linear_proj.weight, attention.core_attention.softmax_scale,
                      layer.pre_mlp_layernorm, fc1, fc2, router.weight, router.topk,
                      mlp.config.moe_router_pre_softmax, *stacked)
    return _Layer(layer.input_layernorm, attention.linear_qkv.weight,
                  attention.linear_proj.weight, attention.core_attention.softmax_scale,
                  layer.pre_mlp_layernorm, [mlp.linear_fc1.weight], [mlp.linear_fc2.weight],
                  None)


def _norm(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def _swiglu(x_TH: torch.Tensor, fc1_GH: torch.Tensor) -> torch.Tensor:
    gate_TF, up_TF = F.linear(x_TH, fc1_GH).chunk(2, dim=-1)
    return F.silu(gate_TF) * up_TF


class LeanCache:
    """Keys and values of ``batch`` rows, up to ``max_length`` columns each, per layer in SDPA's
    [B, K, L, D] layout, and the lean decoder of ``model`` that fills them (``unsupported``
    must be None). The interface of ``model.inference.KVCache``: ``length``, ``keep_rows``,
    ``pad_BL`` (``padded``: which columns are padding)."""

    def __init__(self, model, batch: int, max_length: int, padded: bool = False):
        config = model.config
        self.layers = [_borrow(layer) for layer in model.decoder.layers]
        self.embedding_VH = model.embedding.word_embeddings.weight
        self.final_norm = model.decoder.final_layernorm
        self.head_VH = (model.shared_embedding_or_output_weight()
                        if model.share_embeddings_and_output_weights
                        else model.output_layer.weight)
        self.heads, self.groups = config.num_attention_heads, config.num_query_groups
        self.dim = config.kv_channels
        param = self.embedding_VH
        shape = (batch, self.groups, max_length, self.dim)
        self.keys = [param.new_empty(shape) for _ in self.layers]
        self.values = [param.new_empty(shape) for _ in self.layers]
        # RoPE at every column, as megatron's RotaryEmbedding: fp32 angles, cos/sin in the
        # activations' dtype; [L, D] with the D/2 frequencies twice (rotate-half layout).
        columns = torch.arange(max_length, dtype=model.rotary_pos_emb.inv_freq.dtype)
        angles_LD = torch.outer(columns, model.rotary_pos_emb.inv_freq).repeat(1, 2)
        self.cos_LD = angles_LD.cos().to(param.dtype)
        self.sin_LD = angles_LD.sin().to(param.dtype)
        self.max_length, self.length = max_length, 0
        self.pad_BL = torch.zeros(batch, max_length, dtype=torch.bool) if padded else None

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (row i becomes ``rows[i]`` of before)."""
        index = torch.tensor(rows, dtype=torch.long)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        if self.pad_BL is not None:
            self.pad_BL = self.pad_BL[index]

    def mask(self, s: int, device: torch.device) -> torch.Tensor | None:
        return attention_mask(self.pad_BL, self.length, s, device)

    @torch.no_grad()
    def forward(self, tokens_BS: torch.Tensor, every_column: bool) -> torch.Tensor:
        """Logits (fp32) after the cached columns: [B, V] of the last column, or [B, S, V]."""
        b, s = tokens_BS.shape
        start, end = self.length, self.length + s
        mask_BNSL = self.mask(s, tokens_BS.device)
        causal = mask_BNSL is not None and self.pad_BL is None and start == 0
        h_BSH = F.embedding(tokens_BS, self.embedding_VH)
        for i, layer in enumerate(self.layers):
            attn_BSH = self._attention(i, layer, _norm(layer.norm1, h_BSH), start, end,
                                       None if causal else mask_BNSL, causal)
            h_BSH = h_BSH + attn_BSH
            x_TH = _norm(layer.norm2, h_BSH).view(b * s, -1)
            if layer.router_EH is None:
                mlp_TH = F.linear(_swiglu(x_TH, layer.fc1[0]), layer.fc2[0])
            else:
                mlp_TH = self._moe(layer, x_TH)
            h_BSH = h_BSH + mlp_TH.view_as(h_BSH)
        self.length = end
        if not every_column:
            h_BSH = h_BSH[:, -1:]
        out_BSV = F.linear(_norm(self.final_norm, h_BSH), self.head_VH).float()
        return out_BSV if every_column else out_BSV[:, 0]

    def _attention(self, i: int, layer: _Layer, x_BSH: torch.Tensor, start: int, end: int,
                   mask_BNSL: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, s, _ = x_BSH.shape
        r, d = self.heads // self.groups, self.dim
        qkv_BSKGD = F.linear(x_BSH, layer.qkv_GH).view(b, s, self.groups, r + 2, d)
        # q and k sit side by side in each group: one RoPE over both.
        qk_BSKGD = qkv_BSKGD[:, :, :, :r + 1]
        cos_1S11D = self.cos_LD[start:end].view(1, s, 1, 1, d)
        sin_1S11D = self.sin_LD[start:end].view(1, s, 1, 1, d)
        x1, x2 = qk_BSKGD.chunk(2, dim=-1)
        qk_BSKGD = qk_BSKGD * cos_1S11D + torch.cat((-x2, x1), dim=-1) * sin_1S11D
        q_BNSD = qk_BSKGD[:, :, :, :r].reshape(b, s, self.heads, d).transpose(1, 2)
        self.keys[i][:, :, start:end] = qk_BSKGD[:, :, :, r].transpose(1, 2)
        self.values[i][:, :, start:end] = qkv_BSKGD[:, :, :, r + 1].transpose(1, 2)
        out_BNSD = F.scaled_dot_product_attention(
            q_BNSD, self.keys[i][:, :, :end], self.values[i][:, :, :end],
            attn_mask=None if mask_BNSL is None else ~mask_BNSL, is_causal=causal,
            scale=layer.scale, enable_gqa=self.groups != self.heads)
        return F.linear(out_BNSD.transpose(1, 2).reshape(b, s, -1), layer.proj_HN)

    @staticmethod
    def _moe(layer: _Layer, x_TH: torch.Tensor) -> torch.Tensor:
        logits_TE = F.linear(x_TH.float(), layer.router_EH.float())
        if layer.pre_softmax:
            probs_TK, experts_TK = logits_TE.softmax(dim=-1).topk(layer.top_k, dim=-1)
        else:
            top_TK, experts_TK = logits_TE.topk(layer.top_k, dim=-1)
            probs_TK = top_TK.softmax(dim=-1)
        if x_TH.shape[0] == 1:  # one token (a batch-1 decode step): its k experts in turn
            out_1H = None
            for e, p in zip(experts_TK[0].tolist(), probs_TK[0], strict=True):
                y_1H = F.linear((_swiglu(x_TH, layer.fc1[e]) * p).to(x_TH.dtype), layer.fc2[e])
                out_1H = y_1H if out_1H is None else out_1H + y_1H
            return out_1H
        # Token-expert pairs by expert (then token, as megatron's dispatcher orders them).
        experts_P = experts_TK.flatten()
        order_P = experts_P.argsort(stable=True)
        counts_E = torch.bincount(experts_P, minlength=len(layer.fc1))
        token_P = order_P // layer.top_k
        x_PH, p_P1 = x_TH.index_select(0, token_P), probs_TK.flatten()[order_P, None]
        if layer.fc1_EGH is not None:  # one grouped GEMM per projection (C++ loop on CPU)
            groups = TokenGroups(counts_E, x_TH.device)
            gate_PF, up_PF = grouped_linear(x_PH, layer.fc1_EGH, groups).chunk(2, dim=-1)
            a_PF = (F.silu(gate_PF) * up_PF * p_P1).to(x_TH.dtype)
            y_PH = grouped_linear(a_PF, layer.fc2_EHF, groups)
        else:
            outs, first = [], 0
            for e, count in enumerate(counts_E.tolist()):
                if count:
                    rows = slice(first, first + count)
                    a_CF = (_swiglu(x_PH[rows], layer.fc1[e]) * p_P1[rows]).to(x_TH.dtype)
                    outs.append(F.linear(a_CF, layer.fc2[e]))
                    first += count
            y_PH = torch.cat(outs)
        return torch.zeros_like(x_TH).index_add_(0, token_P, y_PH)
