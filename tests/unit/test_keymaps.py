"""Key tables HF Llama/Mixtral <-> megatron-core: layout, strictness, bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.conversion.keymaps import (
    Arch,
    ConversionError,
    StreamGetter,
    arch_from_hf_config,
    fuse_qkv,
    hf_config_for,
    hf_settings_from_config,
    hf_shapes,
    hf_to_mcore,
    mcore_shapes,
    mcore_to_hf,
)

GQA = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
           ffn_hidden_size=128, vocab_size=256)


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}


def round_trip(arch: Arch, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mcore = dict(hf_to_mcore(hf.__getitem__, arch, keys=hf))
    assert list(mcore) == list(mcore_shapes(arch))
    return dict(mcore_to_hf(mcore.__getitem__, arch, keys=mcore))


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_llama_round_trip_from_transformers_gqa() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    hf = {k: v.detach() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    arch = arch_from_hf_config(cfg.to_dict())
    assert arch == Arch(**GQA)
    assert_bit_exact(round_trip(arch, hf), hf)


def test_mixtral_round_trip_on_disk_names(tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                        num_local_experts=4)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path)  # the on-disk (unfused) expert names
    hf = load_file(tmp_path / "model.safetensors")
    arch = arch_from_hf_config(cfg.to_dict())
    assert arch.num_experts == 4 and arch.moe_layers == {0, 1}
    assert set(hf) == set(hf_shapes(arch))
    assert_bit_exact(round_trip(arch, hf), hf)


def test_mixed_dense_moe_round_trip() -> None:
    arch = Arch(**{**GQA, "num_layers": 3}, num_experts=4, moe_layers={1})
    hf = random_state(hf_shapes(arch))
    assert "model.layers.0.mlp.gate_proj.weight" in hf
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in hf
    assert "model.layers.1.mlp.gate_proj.weight" not in hf
    mcore = dict(hf_to_mcore(hf.__getitem__, arch))
    assert mcore["decoder.layers.0.mlp.linear_fc1.weight"].shape == (256, 64)
    assert mcore["decoder.layers.1.mlp.router.weight"].shape == (4, 64)
    expert_fc2 = mcore["decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"]
    assert expert_fc2.shape == (64, 128)
    assert_bit_exact(dict(mcore_to_hf(mcore.__getitem__, arch)), hf)


def test_fused_qkv_layout_by_query_group() -> None:
    arch = Arch(**GQA)
    d, h = arch.head_dim, arch.hidden_size
    # Tag every row with its head id so the fused order can be read off directly.
    q = torch.arange(4).repeat_interleave(d)[:, None].expand(-1, h).float()
    k = 10 + torch.arange(2).repeat_interleave(d)[:, None].expand(-1, h).float()
    v = 20 + torch.arange(2).repeat_interleave(d)[:, None].expand(-1, h).float()
    fused = fuse_qkv(q, k, v, arch)
    order = fused[::d, 0].tolist()
    assert order == [0, 1, 10, 20, 2, 3, 11, 21]  # group 0: q0 q1 k0 v0; group 1: q2 q3 k1 v1


def test_gate_up_concat_order() -> None:
    arch = Arch(**GQA)
    hf = random_state(hf_shapes(arch))
    mcore = dict(hf_to_mcore(hf.__getitem__, arch))
    fc1 = mcore["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:128], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[128:], hf["model.layers.0.mlp.up_proj.weight"])


def test_padded_vocab_round_trip() -> None:
    arch = Arch(**GQA)
    hf = random_state(hf_shapes(arch))
    mcore = dict(hf_to_mcore(hf.__getitem__, arch, padded_vocab_size=384))
    emb = mcore["embedding.word_embeddings.weight"]
    assert emb.shape == (384, 64) and not emb[256:].any()
    back = dict(mcore_to_hf(mcore.__getitem__, arch, keys=mcore, padded_vocab_size=384))
    assert_bit_exact(back, hf)


def test_strict_missing_unexpected_and_shape() -> None:
    arch = Arch(**GQA)
    hf = random_state(hf_shapes(arch))
    name = "model.layers.1.self_attn.k_proj.weight"
    missing = {k: v for k, v in hf.items() if k != name}
    with pytest.raises(ConversionError, match=name):
        list(hf_to_mcore(missing.__getitem__, arch, keys=missing))
    with pytest.raises(ConversionError, match=name):  # no key list: found when read
        list(hf_to_mcore(missing.__getitem__, arch))
    extra = {**hf, "model.layers.9.foo.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match="model.layers.9.foo.weight"):
        list(hf_to_mcore(extra.__getitem__, arch, keys=extra))
    bad = {**hf, name: torch.zeros(8, 64)}
    with pytest.raises(ConversionError, match=rf"{name} has shape \[8, 64\]"):
        list(hf_to_mcore(bad.__getitem__, arch))
    mcore = dict(hf_to_mcore(hf.__getitem__, arch))
    mcore["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None  # ignored
    list(mcore_to_hf(mcore.__getitem__, arch, keys=mcore))
    mcore.pop("output_layer.weight")
    with pytest.raises(ConversionError, match="output_layer.weight"):
        list(mcore_to_hf(mcore.__getitem__, arch, keys=mcore))


def test_stream_getter_buffers_out_of_order() -> None:
    stream = [("a", torch.zeros(1)), ("b", torch.ones(1)), ("c", torch.full((1,), 2.0))]
    get = StreamGetter(stream)
    assert get("b").item() == 1 and get.buffered == 1
    assert get("a").item() == 0 and get.buffered == 0
    with pytest.raises(KeyError):
        get("a")  # handed out once


def test_config_round_trip_and_transformers_load() -> None:
    from transformers import LlamaConfig, MixtralConfig

    moe = Arch(**GQA, num_experts=8, moe_layers={0, 1})
    cfg = hf_config_for(moe, top_k=2, rms_norm_eps=1e-5, rope_theta=5e5,
                        max_position_embeddings=4096)
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["router_aux_loss_coef"] == 0.02 and cfg["output_router_logits"] is False
    assert cfg["tie_word_embeddings"] is False and "mlp_only_layers" not in cfg
    assert arch_from_hf_config(cfg) == moe
    loaded = MixtralConfig(**cfg)
    assert loaded.rope_parameters["rope_theta"] == 5e5 and loaded.num_local_experts == 8
    assert hf_settings_from_config(loaded.to_dict())["rope_theta"] == 5e5

    dense_cfg = hf_config_for(Arch(**GQA))
    assert dense_cfg["model_type"] == "llama" and arch_from_hf_config(dense_cfg) == Arch(**GQA)
    assert LlamaConfig(**dense_cfg).num_key_value_heads == 2

    mixed = Arch(**GQA, num_experts=4, moe_layers={1})
    mixed_cfg = hf_config_for(mixed)
    assert mixed_cfg["mlp_only_layers"] == [0] and arch_from_hf_config(mixed_cfg) == mixed


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"tie_word_embeddings": True}, "tied"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
])
def test_arch_from_config_rejects(change: dict, match: str) -> None:
    cfg = {**hf_config_for(Arch(**GQA)), **change}
    with pytest.raises(ConversionError, match=match):
        arch_from_hf_config(cfg)
