"""GroupedGemmExperts vs megatron-core's SequentialMLP on CPU in fp32.

Numerics (outputs and all gradients), init, whole-GPTModel loss, spec rewriting, state-dict
conversion, sharded_state_dict equality and dist_checkpointing cross-loading (EP=1; the EP=2
checks live in tests/distributed/test_grouped_experts_ep.py).

Shape legend: T tokens routed to the local experts, E local experts, H hidden, B batch, S seq.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.platform import cpu
from tests.conftest import single_process_megatron

cpu.enable_if_needed()

from megatron.core import dist_checkpointing, tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.mapping import (  # noqa: E402
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection  # noqa: E402

from megatron_ext.model.experts import (  # noqa: E402
    GroupedGemmExperts,
    grouped_to_sequential_state,
    sequential_to_grouped_state,
    use_grouped_experts,
)

H, FFN, NUM_EXPERTS, VOCAB, SEQ = 32, 48, 4, 128, 16
TOL = dict(rtol=1e-5, atol=1e-5)
# Token splits over 4 experts: empty experts, a single busy expert, no tokens at all.
SPLITS = [[5, 0, 11, 4], [0, 0, 17, 0], [3, 1, 0, 9], [0, 0, 0, 0]]
# megatron's RNG tracker warns on CPU, where "CUDA" and CPU RNG are the same generator.
pytestmark = pytest.mark.filterwarnings("ignore:CPU RNG state changed")


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron(seed=1234)


def _config(**overrides) -> TransformerConfig:
    kwargs = dict(
        num_layers=2, hidden_size=H, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        num_moe_experts=NUM_EXPERTS, moe_router_topk=2, moe_aux_loss_coeff=0.02,
        moe_token_dispatcher_type="allgather",
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        use_cpu_initialization=True,
    )  # fmt: skip
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _experts_pair(cfg: TransformerConfig, seed: int = 0, **grouped_kwargs):
    """SequentialMLP and GroupedGemmExperts built from the same seed (hence same weights)."""
    pg = get_default_pg_collection()
    sub = MLPSubmodules(
        linear_fc1=tensor_parallel.ColumnParallelLinear,
        linear_fc2=tensor_parallel.RowParallelLinear,
    )
    modules = []
    for cls, kwargs in ((SequentialMLP, {}), (GroupedGemmExperts, grouped_kwargs)):
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        modules.append(cls(NUM_EXPERTS, cfg, sub, pg_collection=pg, **kwargs))
    return modules


def _stacked(seq: SequentialMLP, linear: str) -> torch.Tensor:
    """[E, out, in] stack of one linear's weight over a SequentialMLP's experts."""
    return torch.stack([getattr(e, linear).weight for e in seq.local_experts])


def _gpt(spec, cfg: TransformerConfig, seed: int) -> GPTModel:
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
    )  # fmt: skip


def _gpt_pair(cfg: TransformerConfig):
    """(SequentialMLP model, grouped model with a different init, grouped spec)."""
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, normalization="RMSNorm")
    grouped_spec = use_grouped_experts(spec)
    return _gpt(spec, cfg, seed=1), _gpt(grouped_spec, cfg, seed=2)


def _loss(model: GPTModel, tokens_BS: torch.Tensor) -> torch.Tensor:
    position_ids_BS = torch.arange(SEQ).expand_as(tokens_BS)
    labels_BS = torch.roll(tokens_BS, -1, dims=1)
    return model(tokens_BS, position_ids_BS, None, labels=labels_BS).mean()


# ---- expert-level numerics --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "auto"])
@pytest.mark.parametrize(
    "act",
    [
        dict(gated_linear_unit=True, activation_func=F.silu),
        dict(gated_linear_unit=True, activation_func=F.gelu),
        dict(gated_linear_unit=False, activation_func=F.gelu),
    ],
    ids=["swiglu", "geglu", "gelu"],
)
def test_forward_backward_match_sequential(backend, act):
    seq, grp = _experts_pair(_config(**act), backend=backend)
    assert torch.equal(grp.fc1_weight, _stacked(seq, "linear_fc1"))
    for split in SPLITS:
        tokens_per_expert = torch.tensor(split)
        x_TH = torch.randn(sum(split), H, requires_grad=True)
        probs_T = torch.rand(sum(split), requires_grad=True)
        out_seq_TH, _ = seq(x_TH, tokens_per_expert, probs_T)
        out_grp_TH, bias = grp(x_TH, tokens_per_expert, probs_T)
        assert bias is None
        torch.testing.assert_close(out_grp_TH, out_seq_TH, **TOL)
        dout_TH = torch.randn_like(out_seq_TH)
        seq_w = [e.linear_fc1.weight for e in seq.local_experts]
        seq_w += [e.linear_fc2.weight for e in seq.local_experts]
        g_seq = torch.autograd.grad(out_seq_TH, [x_TH, probs_T, *seq_w], dout_TH)
        g_grp = torch.autograd.grad(
            out_grp_TH, [x_TH, probs_T, grp.fc1_weight, grp.fc2_weight], dout_TH
        )
        torch.testing.assert_close(g_grp[0], g_seq[0], **TOL)
        torch.testing.assert_close(g_grp[1], g_seq[1], **TOL)
        torch.testing.assert_close(g_grp[2], torch.stack(g_seq[2 : 2 + NUM_EXPERTS]), **TOL)
        torch.testing.assert_close(g_grp[3], torch.stack(g_seq[2 + NUM_EXPERTS :]), **TOL)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(moe_apply_probs_on_input=True, moe_router_topk=1, moe_router_pre_softmax=True),
        # megatron only accepts moe_act recompute together with moe_grouped_gemm=True.
        dict(
            recompute_granularity="selective", recompute_modules=["moe_act"],
            moe_grouped_gemm=True,
        ),  # fmt: skip
        dict(bias_activation_fusion=True),
        dict(activation_func_clamp_value=0.5, glu_linear_offset=1.0),
    ],
    ids=["probs_on_input", "moe_act_recompute", "fused_swiglu", "clamped_glu"],
)
def test_config_variants_match_sequential(overrides):
    seq, grp = _experts_pair(_config(**overrides))
    if "recompute_modules" in overrides:
        assert grp.activation_recompute
    tokens_per_expert = torch.tensor(SPLITS[0])
    x_TH = torch.randn(20, H, requires_grad=True)
    probs_T = torch.rand(20, requires_grad=True)
    outs, grads = [], []
    for module, weights in ((seq, [seq.local_experts[2].linear_fc1.weight]), (grp, [])):
        out_TH, _ = module(x_TH, tokens_per_expert, probs_T)
        out_TH.square().sum().backward()
        outs.append(out_TH.detach())
        grads.append([x_TH.grad.clone(), probs_T.grad.clone(), *weights])
        x_TH.grad = probs_T.grad = None
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    torch.testing.assert_close(grads[1][1], grads[0][1], **TOL)
    torch.testing.assert_close(grp.fc1_weight.grad[2], grads[0][2].grad, **TOL)


@pytest.mark.parametrize("cpu_init", [True, False], ids=["cpu_init", "device_init"])
def test_init_matches_sequential(cpu_init):
    seq, grp = _experts_pair(_config(use_cpu_initialization=cpu_init), seed=5)
    assert torch.equal(grp.fc1_weight, _stacked(seq, "linear_fc1"))
    assert torch.equal(grp.fc2_weight, _stacked(seq, "linear_fc2"))
    assert grp.fc1_weight.allreduce and grp.fc1_weight.tensor_model_parallel
    assert (grp.fc1_weight.partition_dim, grp.fc2_weight.partition_dim) == (1, 2)


def test_forced_grouped_mm_rejects_unsupported_dtype():
    _, grp = _experts_pair(_config(), backend="grouped_mm")
    x_TH = torch.randn(4, H, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grouped_mm unavailable"):
        grp.double()(x_TH, torch.tensor([1, 1, 1, 1]), torch.rand(4, dtype=torch.float64))
    grp.backend = "auto"  # falls back to the loop
    out_TH, _ = grp(x_TH, torch.tensor([1, 1, 1, 1]), torch.rand(4, dtype=torch.float64))
    assert out_TH.shape == (4, H)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_grouped_mm_matches_loop_without_host_sync():
    cfg = _config(params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=False)
    _, grp = _experts_pair(cfg)
    weights = [grp.fc1_weight, grp.fc2_weight]
    for split in SPLITS:
        # Counts left on the GPU (as the flex / no-sync alltoall dispatchers do).
        tokens_per_expert = torch.tensor(split, device="cuda")
        x_TH = torch.randn(sum(split), H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        probs_T = torch.rand(sum(split), device="cuda")
        results = []
        for backend in ("grouped_mm", "loop"):
            grp.backend = backend
            # The grouped path must never wait for the GPU (the loop's .tolist() does).
            torch.cuda.set_sync_debug_mode("error" if backend == "grouped_mm" else "default")
            try:
                out_TH, _ = grp(x_TH, tokens_per_expert, probs_T)
                grads = torch.autograd.grad(out_TH.float().square().sum(), [x_TH, *weights])
            finally:
                torch.cuda.set_sync_debug_mode("default")
            results.append([out_TH, *grads])
        for a, b in zip(*results):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


# ---- whole model -----------------------------------------------------------------------------

# GPTModel on CPU needs megatron_ext.platform.cpu, which stays off when CUDA is present (the
# router alone moves its weight to the GPU then); the EP test covers these on any host.
cpu_path_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="GPTModel on CPU needs the CPU path (off with CUDA)"
)


@cpu_path_only
def test_gpt_model_loss_and_grads_match():
    cfg = _config()
    seq_model, grp_model = _gpt_pair(cfg)
    # SequentialMLP-style keys load directly (GroupedGemmExperts._load_from_state_dict).
    grp_model.load_state_dict(seq_model.state_dict(), strict=True)
    tokens_BS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    loss_seq, loss_grp = _loss(seq_model, tokens_BS), _loss(grp_model, tokens_BS)
    torch.testing.assert_close(loss_grp, loss_seq, **TOL)
    loss_seq.backward()
    loss_grp.backward()
    seq_grads = {n: p.grad for n, p in seq_model.named_parameters()}
    grp_grads = {n: p.grad for n, p in grp_model.named_parameters()}
    converted = sequential_to_grouped_state(seq_grads)
    assert converted.keys() == grp_grads.keys()
    for name, grad in grp_grads.items():
        torch.testing.assert_close(grad, converted[name], **TOL, msg=name)


@cpu_path_only
def test_state_dict_conversion_round_trip():
    seq_model, grp_model = _gpt_pair(_config())
    grp_model.load_state_dict(sequential_to_grouped_state(seq_model.state_dict()), strict=True)
    back = grouped_to_sequential_state(grp_model.state_dict())
    seq_state = {k: v for k, v in seq_model.state_dict().items() if not k.endswith("_extra_state")}
    assert back.keys() - seq_state.keys() <= {k for k in back if k.endswith("_extra_state")}
    for key, value in seq_state.items():
        assert torch.equal(back[key], value), key
    seq_model.load_state_dict(back, strict=True)


@cpu_path_only
def test_use_grouped_experts_on_mixed_block_spec():
    cfg = _config(num_layers=3, moe_layer_freq=[0, 1, 1])
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    swapped = use_grouped_experts(block)
    mlps = [spec.submodules.mlp for spec in swapped.layer_specs]
    assert mlps[0].module is MLP
    assert [m.submodules.experts.module for m in mlps[1:]] == [GroupedGemmExperts] * 2
    # The input spec is left untouched.
    assert block.layer_specs[1].submodules.mlp.submodules.experts.module is SequentialMLP
    model = _gpt(swapped, cfg, seed=0)
    moe = [layer.mlp for layer in model.decoder.layers if isinstance(layer.mlp, MoELayer)]
    assert len(moe) == 2 and all(isinstance(m.experts, GroupedGemmExperts) for m in moe)


# ---- distributed checkpointing ---------------------------------------------------------------


def _flat_shards(model: GPTModel, metadata=None) -> dict:
    """Built sharded state dict as {(key, global_offset): (description, data)}."""
    sharded = model.sharded_state_dict(metadata=metadata)
    apply_factories(sharded)
    flat = {}

    def visit(node):
        if isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
        elif isinstance(node, ShardedTensor):
            desc = (node.global_shape, node.local_shape, node.axis_fragmentations, node.replica_id)
            flat[(node.key, node.global_offset)] = (desc, node.data)
        elif isinstance(node, ShardedObject):
            desc = (node.global_shape, node.replica_id)
            flat[(node.key, node.global_offset)] = (desc, node.data)

    visit(sharded)
    return flat


@cpu_path_only
@pytest.mark.parametrize("singleton", [False, True], ids=["stacked", "singleton_local_shards"])
def test_sharded_state_dict_matches_sequential(singleton):
    seq_model, grp_model = _gpt_pair(_config())
    grp_model.load_state_dict(seq_model.state_dict())
    metadata = {"singleton_local_shards": True} if singleton else None
    seq_flat, grp_flat = _flat_shards(seq_model, metadata), _flat_shards(grp_model, metadata)
    assert seq_flat.keys() == grp_flat.keys()
    assert any("linear_fc1.weight" in key for key, _ in grp_flat)
    for key, (desc, data) in seq_flat.items():
        assert grp_flat[key][0] == desc, key
        if isinstance(data, torch.Tensor):
            assert torch.equal(grp_flat[key][1], data), key


@cpu_path_only
@pytest.mark.parametrize("save_grouped", [False, True], ids=["seq_to_grouped", "grouped_to_seq"])
def test_dist_checkpoint_cross_load(tmp_path, save_grouped):
    seq_model, grp_model = _gpt_pair(_config())
    src, dst = (grp_model, seq_model) if save_grouped else (seq_model, grp_model)
    dist_checkpointing.save(src.sharded_state_dict(), str(tmp_path))
    loaded = dist_checkpointing.load(dst.sharded_state_dict(), str(tmp_path))
    dst.load_state_dict(loaded, strict=True)
    dst_state = dst.state_dict()
    src_state = src.state_dict()
    if save_grouped:
        src_state = grouped_to_sequential_state(src_state)
    else:
        src_state = sequential_to_grouped_state(src_state)
    for key, value in src_state.items():
        if not key.endswith("_extra_state"):
            assert torch.equal(dst_state[key], value), key


def _as_optimizer_state(model: GPTModel) -> dict:
    """Model sharded state rewritten the way DistributedOptimizer's 'fully_reshardable' format
    rewrites it for an optimizer state (new key prefix, state tensor of the param's shape)."""
    sharded = model.sharded_state_dict()
    return {
        name: replace(sh, key=f"optimizer.state.exp_avg.{sh.key}", data=sh.data.detach() * 2 + 1)
        for name, sh in sharded.items()
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory))
    }


@cpu_path_only
@pytest.mark.parametrize("save_grouped", [False, True], ids=["seq_to_grouped", "grouped_to_seq"])
def test_optimizer_state_checkpoint_cross_load(tmp_path, save_grouped):
    seq_model, grp_model = _gpt_pair(_config())
    grp_model.load_state_dict(seq_model.state_dict())
    src, dst = (grp_model, seq_model) if save_grouped else (seq_model, grp_model)
    dist_checkpointing.save(_as_optimizer_state(src), str(tmp_path))
    loaded = dist_checkpointing.load(_as_optimizer_state(dst), str(tmp_path))
    params = dict(dst.named_parameters())
    assert loaded.keys() == params.keys()
    for name, state in loaded.items():
        assert torch.equal(state, params[name].detach() * 2 + 1), name
