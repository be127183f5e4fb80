"""Upcycling methods on tiny random models: what is copied, what is re-drawn, and how."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from megatron_ext.conversion.keymaps import (
    HF_DENSE_MLP,
    HF_EXPERT,
    HF_ROUTER,
    Arch,
    ConversionError,
    hf_shapes,
    hf_to_mcore,
)
from megatron_ext.upcycling import UpcycleError, UpcycleSpec, upcycle, upcycle_mcore
from megatron_ext.upcycling.upcycle import init_router

ARCH = Arch(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
            ffn_hidden_size=128, vocab_size=256)
F, H = ARCH.ffn_hidden_size, ARCH.hidden_size
ROLES = ("gate", "up", "down")


def dense_state(arch: Arch = ARCH, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(arch).items():
        t = torch.randn(shape, generator=g)
        out[name] = (1 + 0.1 * t if name.endswith("norm.weight") else 0.02 * t).to(dtype)
    return out


def run(spec: UpcycleSpec, dense: dict[str, torch.Tensor] | None = None,
        arch: Arch = ARCH) -> dict[str, torch.Tensor]:
    dense = dense_state(arch) if dense is None else dense
    return dict(upcycle(dense.__getitem__, dense, arch, spec))


def neurons(w: torch.Tensor, role: str) -> list[bytes]:
    """Each neuron's weights as bytes: rows of gate/up, columns of down."""
    w = w.t() if role == "down" else w
    return [row.contiguous().view(torch.uint8).numpy().tobytes() for row in w]


def match(expert_w: torch.Tensor, dense_w: torch.Tensor, role: str) -> dict[int, int | None]:
    """Expert neuron j -> the dense neuron it is a bit-exact copy of (None = new)."""
    index = {b: i for i, b in enumerate(neurons(dense_w, role))}
    return {j: index.get(b) for j, b in enumerate(neurons(expert_w, role))}


def experts(out, layer, num_experts):
    for e in range(num_experts):
        yield e, {r: out[HF_EXPERT[r].format(layer=layer, expert=e)] for r in ROLES}


def dense_mlp(dense, layer):
    return {r: dense[HF_DENSE_MLP[r].format(layer=layer)] for r in ROLES}


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_drop_replaces_exactly_floor_r_neurons_with_matched_stats(ratio: float) -> None:
    dense = dense_state()
    spec = UpcycleSpec(method="drop", ratio=ratio, num_experts=4, seed=7)
    out = run(spec, dense)
    k = math.floor(ratio * F)
    for name, t in dense.items():
        if ".mlp." not in name:
            assert torch.equal(out[name], t), name  # non-MLP tensors: verbatim
    for layer in range(ARCH.num_layers):
        mlp = dense_mlp(dense, layer)
        for _, ex in experts(out, layer, 4):
            maps = {r: match(ex[r], mlp[r], r) for r in ROLES}
            for r in ROLES:
                new = [j for j, i in maps[r].items() if i is None]
                kept = [i for i in maps[r].values() if i is not None]
                assert len(new) == k and len(set(kept)) == F - k
                # The replaced slice = dense neurons no longer present; compare its statistics.
                replaced = sorted(set(range(F)) - set(kept))
                old_vals = (mlp[r].t() if r == "down" else mlp[r])[replaced].float()
                new_vals = (ex[r].t() if r == "down" else ex[r])[new].float()
                sem = old_vals.std() / math.sqrt(k * H)
                assert abs(new_vals.mean() - old_vals.mean()) < 4 * sem
                assert 0.9 < new_vals.std() / old_vals.std() < 1.1
            # Kept neurons follow ONE permutation across gate, up and down.
            for j in range(F):
                sources = {maps[r][j] for r in ROLES} - {None}
                assert len(sources) <= 1
        gates = [ex["gate"] for _, ex in experts(out, layer, 4)]
        assert all(not torch.equal(a, b) for i, a in enumerate(gates) for b in gates[i + 1:])


def test_index_sharing_shared_vs_per_projection() -> None:
    dense = dense_state()
    for sharing, expect_same in (("shared", True), ("per_projection", False)):
        spec = UpcycleSpec(method="drop", ratio=0.5, num_experts=4, index_sharing=sharing)
        out = run(spec, dense)
        same = []
        for layer in range(ARCH.num_layers):
            mlp = dense_mlp(dense, layer)
            for _, ex in experts(out, layer, 4):
                new = [{j for j, i in match(ex[r], mlp[r], r).items() if i is None} for r in ROLES]
                assert all(len(s) == F // 2 for s in new)
                same.append(new[0] == new[1] == new[2])
        assert all(same) if expect_same else not any(same)


def test_seed_reproducible_and_documented_draw_order() -> None:
    dense = dense_state()
    spec = UpcycleSpec(method="drop", ratio=0.5, num_experts=4, seed=123)
    a, b = run(spec, dense), run(spec, dense)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = run(replace(spec, seed=124), dense)
    assert not torch.equal(a["model.layers.0.block_sparse_moe.experts.0.w1.weight"],
                           c["model.layers.0.block_sparse_moe.experts.0.w1.weight"])
    # Re-derive routers and layer 0 / expert 0 from the order documented in upcycle.py.
    g = torch.Generator().manual_seed(123)
    routers = [torch.rand(4, H, generator=g) for _ in range(ARCH.num_layers)]
    for layer, u in enumerate(routers):
        want = ((u - u.mean()) * 0.02 * math.sqrt(12)).to(torch.bfloat16)
        assert torch.equal(a[HF_ROUTER.format(layer=layer)], want)
    perm = torch.randperm(F, generator=g)
    idx = {}
    for r in ("gate", "down", "up"):
        idx[r] = set(torch.randperm(F, generator=g)[: F // 2].tolist())
        torch.normal(0.0, 1.0, (F // 2, H), generator=g)  # the slice's samples
    mlp = dense_mlp(dense, 0)
    for r in ROLES:
        got = match(a[HF_EXPERT[r].format(layer=0, expert=0)], mlp[r], r)
        assert {j for j, i in got.items() if i is None} == idx[r]
        assert all(i == perm[j].item() for j, i in got.items() if i is not None)


@pytest.mark.parametrize("method,moe_layers", [
    ("drop", None), ("noise", None), ("naive", None), ("drop", {0, 2}), ("drop", {1, 2}),
])
def test_streaming_reads_each_key_once_lazily_and_at_most_one_layer_ahead(
        method: str, moe_layers: set[int] | None) -> None:
    """Model order, except for drop / noise MoE layers, whose experts' draws start early: layer
    0 has its dense MLP read before anything (its draws run while the embedding is written);
    a layer right after another MoE layer has its MLP read as that one's experts start, right
    after that one's attention (its draws start when that one's last draws are done)."""
    arch = replace(ARCH, num_layers=3)
    dense = dense_state(arch)
    reads: list[tuple[str, int]] = []  # (key, outputs so far)
    names: list[str] = []

    def get(name: str) -> torch.Tensor:
        reads.append((name, len(names)))
        return dense[name]

    spec = UpcycleSpec(method=method, num_experts=4, moe_layers=moe_layers)
    stream = upcycle(get, dense, arch, spec)
    assert reads == []
    for name, _ in stream:
        names.append(name)
    moe = spec.moe_arch(arch).moe_layers
    drawn = method in ("drop", "noise")
    want = list(hf_shapes(arch))

    def mlp_of(layer: int) -> list[str]:
        return [HF_DENSE_MLP[r].format(layer=layer) for r in ("gate", "up", "down")]

    if drawn and 0 in moe:
        want = mlp_of(0) + [key for key in want if key not in mlp_of(0)]
    early = {n for n in moe if n - 1 in moe and drawn}
    for layer in sorted(early):
        want = [key for key in want if key not in mlp_of(layer)]
        at = want.index(f"model.layers.{layer - 1}.post_attention_layernorm.weight") + 1
        if layer - 1 not in early and layer - 1 != 0:  # the previous layer's own MLP first
            at += 3
        want[at:at] = mlp_of(layer)
    assert [key for key, _ in reads] == want
    assert names == list(hf_shapes(spec.moe_arch(arch)))
    for key, made in reads:  # never more than one layer ahead of the output
        if key.startswith("model.layers.") and (layer := int(key.split(".")[2])) > 0:
            assert any(n.startswith(f"model.layers.{layer - 1}.") for n in names[:made]), key
            if layer in early and ".mlp." in key:  # as the previous layer's experts start
                before = f"model.layers.{layer - 1}.post_attention_layernorm.weight"
                assert names[made - 1] == before, key
        elif key in mlp_of(0) and drawn and 0 in moe:  # before anything
            assert made == 0, key


@pytest.mark.parametrize("how", ["uniform_std002", "normal_std002"])
def test_router_init_zero_mean_std_002(how: str) -> None:
    w = init_router(8, 4096, how, torch.Generator().manual_seed(0))
    assert w.shape == (8, 4096)
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 0.02 * 0.03
    if how == "uniform_std002":
        assert abs(w.mean().item()) < 1e-6  # centred on the sample mean
        assert w.abs().max().item() <= 0.02 * math.sqrt(3) * 1.01
    out = run(UpcycleSpec(method="naive", num_experts=4, router_init=how))
    assert out[HF_ROUTER.format(layer=1)].shape == (4, H)


def test_noise_adds_noise_to_exactly_floor_r_neurons() -> None:
    # Neuron i of every matrix sits near the value i, so a noisy neuron's source is obvious.
    dense = dense_state(dtype=torch.float32)
    for layer in range(ARCH.num_layers):
        for r, w in dense_mlp(dense, layer).items():
            offsets = torch.arange(F, dtype=torch.float32)
            w += offsets[None, :] if r == "down" else offsets[:, None]
    out = run(UpcycleSpec(method="noise", ratio=0.5, num_experts=4, noise_std=0.03), dense)
    for layer in range(ARCH.num_layers):
        mlp = dense_mlp(dense, layer)
        for _, ex in experts(out, layer, 4):
            for r in ROLES:
                new = [j for j, i in match(ex[r], mlp[r], r).items() if i is None]
                assert len(new) == F // 2
                w_new = (ex[r].t() if r == "down" else ex[r])[new]
                src = (mlp[r].t() if r == "down" else mlp[r])[w_new.mean(1).round().long()]
                diff = w_new - src
                assert abs(diff.mean()) < 0.003 and abs(diff.std() - 0.03) < 0.003


def test_btx_averages_and_assigns_experts_by_source() -> None:
    arch = replace(ARCH, num_layers=3)
    srcs = [dense_state(arch, seed=s) for s in range(4)]
    spec = UpcycleSpec(method="btx", num_experts=8, moe_layers={0, 2},
                       btx_sources=tuple(s.__getitem__ for s in srcs[1:]))
    out = run(spec, srcs[0], arch)
    for name in srcs[0]:
        if ".block_sparse_moe." in name or (".mlp." in name and ".layers.1." not in name):
            continue
        want = torch.stack([s[name].float() for s in srcs]).mean(0)
        torch.testing.assert_close(out[name].float(), want, rtol=2**-7, atol=1e-6)  # incl. layer 1
    for layer in (0, 2):
        for e, ex in experts(out, layer, 8):
            for r in ROLES:
                assert torch.equal(ex[r], dense_mlp(srcs[e // 2], layer)[r])
    small = dense_state(replace(arch, ffn_hidden_size=64), seed=9)
    bad = replace(spec, btx_sources=(srcs[1].__getitem__, small.__getitem__, srcs[3].__getitem__))
    with pytest.raises(ConversionError, match="btx source 2: model.layers.0.mlp.gate_proj.weight"):
        run(bad, srcs[0], arch)


def test_scratch_distribution_and_norms() -> None:
    dense = dense_state()
    out = run(UpcycleSpec(method="scratch", num_experts=4, init_std=0.05))
    for name, t in out.items():
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif ".block_sparse_moe.gate." in name:
            assert abs(t.float().std() - 0.02) < 0.003, name
        else:
            assert abs(t.float().mean()) < 0.01 and abs(t.float().std() - 0.05) < 0.005, name
            assert t.dtype == torch.bfloat16
    assert not torch.equal(out["lm_head.weight"], dense["lm_head.weight"])


def test_mcore_adapter_matches_hf_path_bit_exact() -> None:
    arch = replace(ARCH, num_layers=3)
    dense = dense_state(arch)
    spec = UpcycleSpec(method="drop", ratio=0.5, num_experts=4, moe_layers={0, 2}, seed=5)
    want = dict(hf_to_mcore(run(spec, dense, arch).__getitem__, spec.moe_arch(arch)))
    dense_mcore = dict(hf_to_mcore(dense.__getitem__, arch))
    got = dict(upcycle_mcore(dense_mcore.__getitem__, dense_mcore, arch, spec))
    assert list(got) == list(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert "decoder.layers.1.mlp.linear_fc1.weight" in got  # the dense layer stays dense


@pytest.mark.parametrize("change, match", [
    ({"ratio": -0.1}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"ratio": float("nan")}, "ratio"),
    ({"top_k": 5}, "top_k"), ({"top_k": 0}, "top_k"), ({"method": "magic"}, "method"),
    ({"index_sharing": "x"}, "index_sharing"), ({"router_init": "x"}, "router_init"),
    ({"noise_std": 0.0}, "noise_std"), ({"moe_layers": {5}}, "moe_layers"),
    ({"moe_layers": set()}, "moe_layers"), ({"method": "btx"}, "btx"),
    ({"method": "btx", "num_experts": 3, "top_k": 2, "btx_sources": (lambda n: None,)},
     "divisible"),
    ({"btx_sources": (lambda n: None,)}, "btx"), ({"seed": -1}, "seed"),
])
def test_bad_specs_raise(change: dict, match: str) -> None:
    spec = replace(UpcycleSpec(num_experts=4), **change)
    dense = dense_state()
    with pytest.raises(UpcycleError, match=match):
        upcycle(dense.__getitem__, dense, ARCH, spec)


def test_moe_input_rejected() -> None:
    moe_arch = UpcycleSpec(num_experts=4).moe_arch(ARCH)
    with pytest.raises(UpcycleError, match="already an MoE"):
        upcycle(lambda n: None, hf_shapes(moe_arch), moe_arch, UpcycleSpec(num_experts=4))
