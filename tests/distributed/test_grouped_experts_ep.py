"""GroupedGemmExperts under expert parallelism: 2 gloo processes on CPU, allgather dispatcher.

One spawned job runs four phases so megatron is imported once per process:
  1. EP=2: grouped and SequentialMLP GPT models give the same loss and gradients, and the same
     sharded_state_dict; each model type saves a checkpoint.
  2. EP=1 (expert-DP=2): each checkpoint loads into the *other* module type; every global
     expert has the weights it was saved with. The grouped model saves again.
  3. EP=2: that EP=1 grouped checkpoint loads into SequentialMLP.
  4. expert-TP=2 (EP=1): same init, loss, gradients and sharded metadata as SequentialMLP
     (fc1's [gate; up] halves are split per rank); the EP=1 checkpoint loads into both.
Expert weights are set from the global expert index, so a wrong expert mapping is caught.

Shape legend: B batch, S sequence, E local experts, G/H/F as in megatron_ext/model/experts.py.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from tests.conftest import free_port, spawn_workers

WORLD_SIZE, NUM_EXPERTS, VOCAB, SEQ, HIDDEN, FFN = 2, 4, 128, 16, 32, 48
TIMEOUT_S = 240


def _expert_weight(global_expert: int, shape: torch.Size, which: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * which + global_expert)
    return torch.randn(shape, generator=generator) * 0.05


def _worker(rank: int, port: int, ckpt_root: str) -> None:
    from megatron_ext.platform import cpu

    cpu.enable_if_needed()
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.model.experts import (
        GroupedGemmExperts,
        sequential_to_grouped_state,
        use_grouped_experts,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    seq_spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, normalization="RMSNorm")
    grp_spec = use_grouped_experts(seq_spec)

    def setup(ep: int, etp: int = 1) -> TransformerConfig:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            1, 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp
        )
        return TransformerConfig(
            num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=FFN, normalization="RMSNorm", gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False, num_moe_experts=NUM_EXPERTS,
            moe_router_topk=2, moe_aux_loss_coeff=0.02, moe_token_dispatcher_type="allgather",
            hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
            use_cpu_initialization=True, expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        )  # fmt: skip

    def build(spec, cfg: TransformerConfig, seed: int) -> GPTModel:
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return GPTModel(
            config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
            position_embedding_type="rope", share_embeddings_and_output_weights=False,
        )  # fmt: skip

    def experts_of(model: GPTModel) -> list:
        return [layer.mlp.experts for layer in model.decoder.layers]

    def expected(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[E, G, H], [E, H, F] weights this rank must hold (its experts, its expert-TP part)."""
        e_local = NUM_EXPERTS // parallel_state.get_expert_model_parallel_world_size()
        first = parallel_state.get_expert_model_parallel_rank() * e_local
        f = FFN // parallel_state.get_expert_tensor_parallel_world_size()
        tp_rank = parallel_state.get_expert_tensor_parallel_rank()
        cols = slice(tp_rank * f, (tp_rank + 1) * f)
        fc1, fc2 = [], []
        for g in range(first, first + e_local):
            gate_FH, up_FH = _expert_weight(g, (2 * FFN, HIDDEN), 2 * layer).chunk(2)
            fc1.append(torch.cat([gate_FH[cols], up_FH[cols]]))  # each rank: [gate_r; up_r]
            fc2.append(_expert_weight(g, (HIDDEN, FFN), 2 * layer + 1)[:, cols])
        return torch.stack(fc1), torch.stack(fc2)

    def set_experts(model: GPTModel) -> None:
        with torch.no_grad():
            for layer, experts in enumerate(experts_of(model)):
                fc1, fc2 = expected(layer)
                if isinstance(experts, GroupedGemmExperts):
                    experts.fc1_weight.copy_(fc1)
                    experts.fc2_weight.copy_(fc2)
                else:
                    for e, mlp in enumerate(experts.local_experts):
                        mlp.linear_fc1.weight.copy_(fc1[e])
                        mlp.linear_fc2.weight.copy_(fc2[e])

    def check_experts(model: GPTModel) -> None:
        for layer, experts in enumerate(experts_of(model)):
            fc1, fc2 = expected(layer)
            if isinstance(experts, GroupedGemmExperts):
                got = experts.fc1_weight, experts.fc2_weight
            else:
                got = (
                    torch.stack([m.linear_fc1.weight for m in experts.local_experts]),
                    torch.stack([m.linear_fc2.weight for m in experts.local_experts]),
                )
            assert torch.equal(got[0], fc1) and torch.equal(got[1], fc2), (rank, layer)

    def save(model: GPTModel, name: str) -> None:
        path = os.path.join(ckpt_root, name)
        os.makedirs(path, exist_ok=True)  # dist_checkpointing expects an existing directory
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), path)

    def load(model: GPTModel, name: str) -> None:
        path = os.path.join(ckpt_root, name)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))

    def shard_meta(model: GPTModel) -> set:
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        found = set()

        def visit(node):
            if isinstance(node, (dict, list)):
                for child in node.values() if isinstance(node, dict) else node:
                    visit(child)
            elif isinstance(node, ShardedTensor):
                found.add((node.key, node.global_shape, node.global_offset, node.replica_id))

        visit(sharded)
        return found

    def check_same_numerics(seq_model: GPTModel, grp_model: GPTModel) -> None:
        """Same loss, same gradients of every parameter, same sharded checkpoint metadata."""
        generator = torch.Generator().manual_seed(rank)
        tokens_BS = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
        position_ids_BS = torch.arange(SEQ).expand_as(tokens_BS)
        labels_BS = torch.roll(tokens_BS, -1, dims=1)
        losses = []
        for model in (seq_model, grp_model):
            loss = model(tokens_BS, position_ids_BS, None, labels=labels_BS).mean()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        seq_grads = {n: p.grad for n, p in seq_model.named_parameters()}
        seq_grads = sequential_to_grouped_state(seq_grads)
        for name, param in grp_model.named_parameters():
            torch.testing.assert_close(param.grad, seq_grads[name], rtol=1e-5, atol=1e-5)
        assert shard_meta(seq_model) == shard_meta(grp_model)

    # ---- phase 1: EP=2 numerics, sharded metadata, saves ----
    cfg = setup(ep=2)
    seq_model, grp_model = build(seq_spec, cfg, seed=1), build(grp_spec, cfg, seed=2)
    set_experts(seq_model)
    grp_model.load_state_dict(seq_model.state_dict(), strict=True)
    check_experts(grp_model)
    check_same_numerics(seq_model, grp_model)
    save(seq_model, "seq_ep2")
    save(grp_model, "grp_ep2")

    # ---- phase 2: EP=1 loads the EP=2 checkpoints into the other module type ----
    cfg = setup(ep=1)
    grp_model, seq_model = build(grp_spec, cfg, seed=3), build(seq_spec, cfg, seed=4)
    load(grp_model, "seq_ep2")
    load(seq_model, "grp_ep2")
    check_experts(grp_model)
    check_experts(seq_model)
    save(grp_model, "grp_ep1")

    # ---- phase 3: EP=2 SequentialMLP loads the EP=1 grouped checkpoint ----
    cfg = setup(ep=2)
    seq_model = build(seq_spec, cfg, seed=5)
    load(seq_model, "grp_ep1")
    check_experts(seq_model)

    # ---- phase 4: expert-TP=2: init, numerics, metadata, loading the EP=1 checkpoint ----
    cfg = setup(ep=1, etp=2)
    seq_model, grp_model = build(seq_spec, cfg, seed=6), build(grp_spec, cfg, seed=6)
    for seq_experts, grp_experts in zip(experts_of(seq_model), experts_of(grp_model)):
        fc1 = torch.stack([m.linear_fc1.weight for m in seq_experts.local_experts])
        assert fc1.shape == grp_experts.fc1_weight.shape == (NUM_EXPERTS, FFN, HIDDEN)
        assert torch.equal(grp_experts.fc1_weight, fc1)  # same stride-2 init split
    check_same_numerics(seq_model, grp_model)
    load(grp_model, "grp_ep1")
    load(seq_model, "grp_ep1")
    check_experts(grp_model)
    check_experts(seq_model)

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.slow  # ~30 s on 2 shared cores: two interpreters importing megatron, 4 phases
def test_grouped_experts_expert_parallel(tmp_path, monkeypatch):
    # Workers always take megatron_ext's CPU path (gloo), also on a GPU host.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    spawn_workers(_worker, (free_port(), str(tmp_path)), WORLD_SIZE, TIMEOUT_S, "EP=2")
