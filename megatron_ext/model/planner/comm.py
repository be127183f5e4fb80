"""Communication of one optimizer step per rank: message sizes as megatron-core 0.16.1 hands
them to torch.distributed, and their time on the cluster.

Message bytes are what the caller passes (all-gather: the gathered output; reduce-scatter: the
full input; all-to-all: the input; point-to-point: the tensor sent), per rank per step.
tests/distributed/test_comm_volumes.py counts them in a real gloo run. Per micro-batch and layer,
with sequence parallelism (tokens T = seq x micro-batch, bf16 activations):
  attention and dense MLP blocks: all-gather 3 x [T, h] (forward input, backward re-gather for
      the weight gradient, gradient of the row-parallel output), reduce-scatter 2 x [T, h]
  MoE block (alltoall dispatcher): EP all-to-all 4 x [T k / tp, h] (dispatch, combine, and
      their gradients) + 2 x [T k / tp] fp32 routing probabilities; with TP, the dispatched
      tokens are all-gathered over TP and reduce-scattered back, 2 x [T k, h] (+ probs) each
  embedding (first stage) and LM head (last stage): one all-gather and one reduce-scatter each
Per step: gradients reduce-scattered in fp32 (``grad_reduce_in_fp32``) and parameters
all-gathered once per chained optimizer (megatron's ``ChainedOptimizer.step_with_ready_grads``
calls every ``DistributedOptimizer``, and each gathers the whole model chunk: twice for an MoE,
whose dense and expert parameters have optimizers of their own); without the distributed
optimizer one fp32 all-reduce. Dense parameters over the data-parallel group, expert
parameters over the expert-data-parallel group (dp / ep ranks). Pipeline: [s / tp, b, h] per
micro-batch forward and its gradient backward, per chunk boundary (v per stage interleaved).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.config.schema import ClusterConfig, Config
from megatron_ext.model.planner.costs import (
    DP_EXPOSED,
    EP_EXPOSED,
    GRAD_BYTES,
    PP_EXPOSED,
    TP_EXPOSED,
    Layout,
    rank_params,
)

PROB_BYTES = 4  # the router runs in fp32 (moe_router_dtype): its probabilities travel in fp32


@dataclass(frozen=True)
class Traffic:
    """One kind of message of one parallel dimension: bytes per rank per step and calls."""

    dim: str  # tp | ep | dp | edp | pp
    op: str  # all_gather | reduce_scatter | all_reduce | all_to_all | p2p
    bytes: float
    calls: float


def group(lay: Layout, dim: str) -> tuple[int, int]:
    """(size, rank stride) of a group in megatron's "tp-cp-ep-dp-pp" rank order."""
    return {"tp": (lay.tensor, 1), "ep": (lay.expert, lay.tensor),
            "dp": (lay.data, lay.tensor),
            "edp": (max(1, lay.data // lay.expert), lay.tensor * lay.expert),
            "pp": (lay.pipeline, lay.tensor * lay.data)}[dim]


def traffic(cfg: Config, lay: Layout, layers: int, moe_layers: int, first: bool, last: bool,
            act_bytes: int, param_bytes: int) -> list[Traffic]:
    """Messages of one rank of a stage holding ``layers`` layers (``moe_layers`` of them MoE),
    the embedding if ``first`` and the LM head if ``last``; groups of one rank left out."""
    m, moe = cfg.model, cfg.moe
    H, T, mb = m.hidden_size, cfg.data.seq_length * lay.micro_batch, lay.micro_batches
    k = moe.top_k
    out: list[Traffic] = []
    if lay.tensor > 1:
        blocks = layers + (layers - moe_layers)  # attention blocks + dense MLP blocks
        ends = int(first) + int(last)
        th = T * H * act_bytes * mb
        moe_tp = moe_layers * mb * (2 * T * k * H * act_bytes + T * k * PROB_BYTES)
        out += [Traffic("tp", "all_gather", th * (3 * blocks + ends) + moe_tp,
                        mb * (3 * blocks + ends + 4 * moe_layers)),
                Traffic("tp", "reduce_scatter", th * (2 * blocks + ends) + moe_tp,
                        mb * (2 * blocks + ends + 4 * moe_layers))]
    if lay.expert > 1 and moe_layers:
        tokens = T * k / lay.tensor
        out.append(Traffic("ep", "all_to_all",
                           moe_layers * mb * (4 * tokens * H * act_bytes + 2 * tokens * PROB_BYTES),
                           moe_layers * mb * 6))
    dense, experts = rank_params(cfg, lay)
    gathers = 2 if moe.num_experts else 1
    for dim, params in (("dp", dense), ("edp", experts)):
        if group(lay, dim)[0] == 1 or not params:
            continue
        if lay.distributed_optimizer:
            out += [Traffic(dim, "reduce_scatter", params * GRAD_BYTES, 1),
                    Traffic(dim, "all_gather", gathers * params * param_bytes, gathers)]
        else:
            out.append(Traffic(dim, "all_reduce", params * GRAD_BYTES, 1))
    if lay.pipeline > 1:
        # Each model chunk sends its output forward and its input's gradient backward, except
        # the model's first chunk (no gradient to send) and last chunk (no output to send).
        sends = mb * (2 * lay.virtual_pipeline - int(first) - int(last))
        out.append(Traffic("pp", "p2p", sends * T * H * act_bytes / lay.tensor, sends))
    return out


def wire_factor(op: str, n: int) -> float:
    """Bytes a rank sends per message byte (ring algorithms; p2p counts what is sent)."""
    return {"all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "all_reduce": 2 * (n - 1) / n, "all_to_all": (n - 1) / n, "p2p": 1.0}[op]


def seconds(t: Traffic, lay: Layout, cl: ClusterConfig) -> float:
    """Time of ``t`` over NVLink when its group fits in a node, else over InfiniBand (each GPU
    on its own rail: the node's bandwidth / GPUs per node); all-to-all splits its bytes into
    the part that stays in the node and the part that leaves it, sent at the same time."""
    n, stride = group(lay, t.dim)
    intra, inter = cl.intra_node_gbs * 1e9, cl.inter_node_gbs * 1e9 / cl.gpus_per_node
    wire = t.bytes * wire_factor(t.op, n)
    on_node = max(1, min(n, cl.gpus_per_node // stride))  # ranks of the group on this node
    if t.dim == "pp":  # a stage's neighbours are ``stride`` ranks away
        spans = stride >= cl.gpus_per_node
    else:
        spans = on_node < n
    latency = (cl.inter_node_latency_us if spans else cl.intra_node_latency_us) * 1e-6
    steps = {"all_reduce": 2 * (n - 1), "all_to_all": 1, "p2p": 1}.get(t.op, n - 1)
    if t.op == "all_to_all" and spans:
        off = t.bytes * (n - on_node) / n
        moved = max(off / inter, (wire - off) / intra)
    else:
        moved = wire / (inter if spans else intra)
    return (moved + t.calls * steps * latency) * EXPOSED[t.dim]


EXPOSED = {"tp": TP_EXPOSED, "ep": EP_EXPOSED, "dp": DP_EXPOSED, "edp": DP_EXPOSED,
           "pp": PP_EXPOSED}
