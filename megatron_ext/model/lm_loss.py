"""The LM head and its cross-entropy as one autograd function, without fp32 [tokens, vocab] tensors.

megatron-core's path (``output_layer`` then ``vocab_parallel_cross_entropy``) upcasts the whole
logits tensor to fp32 and keeps the fp32 softmax alive until backward. At the paper's shapes
(16k tokens per micro-batch, 99,584-entry vocabulary) that is 6.5 GB per fp32 copy, several
copies at the peak, and ~10 full passes over them in memory-bound elementwise kernels.

Here the logits stay in the model dtype (one [T, V] tensor, kept for backward), and all fp32 math
(log-sum-exp, target logit, softmax gradient) runs over token chunks of at most ``CHUNK_ELEMENTS``
entries. Backward overwrites the kept logits with their gradient in place, then runs the dgrad
and wgrad GEMMs at full size. With ``fuse=True`` the two per-chunk elementwise functions are
``torch.compile``d, so each becomes a few fused kernels instead of one per operation (how many
is for the GPU profile to show).

Vocabulary-parallel: each TP rank holds a slice of the vocabulary; the per-token local
log-sum-exp and target logit are combined across the TP group with two small all-reduces. The
hidden states enter through megatron's own TP mappings (sequence-parallel all-gather, or the
identity whose backward all-reduces), exactly as ``ColumnParallelLinear`` does.

Math, for one token with logits z, target y and upstream gradient g:
    loss = logsumexp(z) - z[y],   dloss/dz = g * (softmax(z) - onehot(y)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_ext.model import fusion

# fp32 entries per chunk: 2**26 (256 MB) bounds the transient fp32 memory while keeping each
# elementwise kernel large enough to run at full memory bandwidth.
CHUNK_ELEMENTS = 2**26


def _chunk_stats(z_CV: torch.Tensor, idx_C: torch.Tensor, local_C: torch.Tensor):
    """fp32 log-sum-exp over this rank's vocabulary slice, and the target logit (0 if the
    target lives on another rank)."""
    z = z_CV.float()
    lse_C = torch.logsumexp(z, dim=-1)
    target_C = torch.where(local_C, z.gather(1, idx_C.unsqueeze(1)).squeeze(1), 0.0)
    return lse_C, target_C


def _chunk_grad(z_CV: torch.Tensor, lse_C: torch.Tensor, idx_C: torch.Tensor,
                local_C: torch.Tensor, grad_C: torch.Tensor) -> torch.Tensor:
    """g * (softmax - onehot) in the logits' dtype, computed in place on one fp32 buffer: a
    copy of bf16 logits, or the fp32 logits themselves (the caller's buffer, free to reuse)."""
    p = z_CV.float()
    p.sub_(lse_C.unsqueeze(1)).exp_()
    rows = torch.arange(p.shape[0], device=p.device)
    p[rows, idx_C] -= local_C.to(p.dtype)  # the one-hot touches one entry per row
    p.mul_(grad_C.unsqueeze(1))
    return p.to(z_CV.dtype)


def _chunks(tokens: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, tokens, step):
        yield slice(start, min(start + step, tokens))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TH, w_VH, labels_T, tp_group, fuse):
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        vocab = w_VH.shape[0]
        start = dist.get_rank(tp_group) * vocab if tp_size > 1 else 0
        local_T = (labels_T >= start) & (labels_T < start + vocab)
        idx_T = torch.where(local_T, labels_T - start, 0)
        z_TV = h_TH @ w_VH.t()
        lse_T = torch.empty(z_TV.shape[0], dtype=torch.float32, device=z_TV.device)
        target_T = torch.empty_like(lse_T)
        for c in _chunks(z_TV.shape[0], vocab):
            lse_T[c], target_T[c] = fusion.run(_chunk_stats, fuse, z_TV[c], idx_T[c], local_T[c])
        if tp_size > 1:
            # logsumexp over ranks of the local log-sum-exps, stabilised by their max.
            peak_T = lse_T.clone()
            dist.all_reduce(peak_T, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack([torch.exp(lse_T - peak_T), target_T])
            dist.all_reduce(sums, group=tp_group)
            lse_T = peak_T + torch.log(sums[0])
            target_T = sums[1]
        ctx.save_for_backward(h_TH, w_VH, z_TV, lse_T, idx_T, local_T)
        ctx.fuse = fuse
        return lse_T - target_T

    @staticmethod
    def backward(ctx, grad_T):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("fused LM loss: backward ran twice (its logits buffer is reused "
                               "for the gradient); use model.lm_loss=megatron with retain_graph")
        ctx.consumed = True
        h_TH, w_VH, z_TV, lse_T, idx_T, local_T = ctx.saved_tensors
        grad_T = grad_T.float()
        for c in _chunks(z_TV.shape[0], z_TV.shape[1]):
            g_CV = fusion.run(
                _chunk_grad, ctx.fuse, z_TV[c], lse_T[c], idx_T[c], local_T[c], grad_T[c])
            if g_CV.data_ptr() != z_TV[c].data_ptr():  # fp32 eager already wrote in place
                z_TV[c] = g_CV
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = z_TV @ w_VH
        if ctx.needs_input_grad[1]:
            grad_w = z_TV.t() @ h_TH
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    hidden_SBH: torch.Tensor, weight_VH: torch.Tensor, labels_SB: torch.Tensor, *,
    tp_group: dist.ProcessGroup | None = None, sequence_parallel: bool = False,
    fuse: bool = False,
) -> torch.Tensor:
    """Per-token loss [S, B] of ``hidden @ weight.T`` against ``labels``.

    ``weight_VH`` is this rank's vocabulary slice (``ColumnParallelLinear`` layout);
    ``hidden_SBH`` is sequence-sharded when ``sequence_parallel`` (as the output layer gets it).
    """
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if tp_size > 1:
        if sequence_parallel:
            hidden_SBH = gather_from_sequence_parallel_region(
                hidden_SBH, tensor_parallel_output_grad=True, group=tp_group)
        else:
            hidden_SBH = copy_to_tensor_model_parallel_region(hidden_SBH, group=tp_group)
    s, b, h = hidden_SBH.shape
    if labels_SB.shape != (s, b):
        raise ValueError(f"labels {tuple(labels_SB.shape)} do not match hidden {(s, b)}")
    loss_T = _LinearCrossEntropy.apply(
        hidden_SBH.reshape(s * b, h), weight_VH, labels_SB.reshape(s * b), tp_group, fuse)
    return loss_T.view(s, b)


class FusedLossGPTModel(GPTModel):
    """megatron's GPTModel whose training loss goes through ``linear_cross_entropy``.

    Only the labelled, non-inference, no-MTP case is rerouted; everything else (logits for
    generation and evaluation tools, multi-token prediction) is megatron's own code. Parameters,
    state dicts and checkpoints are GPTModel's."""

    fuse_kernels: bool = False

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        plain = (
            labels is None or not self.post_process or kwargs.get("mtp_in_postprocess")
            or self.config.mtp_num_layers is not None
            or kwargs.get("inference_context") is not None
            or self.output_layer.bias is not None or self.config.defer_embedding_wgrad_compute
        )
        if plain:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        loss_SB = linear_cross_entropy(
            hidden_states, weight, labels.transpose(0, 1).contiguous(),
            tp_group=self.pg_collection.tp, sequence_parallel=self.output_layer.sequence_parallel,
            fuse=self.fuse_kernels,
        )
        return loss_SB.transpose(0, 1).contiguous()  # [b, s], as megatron returns it
