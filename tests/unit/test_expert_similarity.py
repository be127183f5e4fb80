"""Expert diversity metrics (megatron_ext/training/callbacks/expert_similarity.py) have the values
its docstring derives, at step 0, on real models initialized by the real upcycling library:

 * naive upcycling: exactly 1.0 (both expert modules: our grouped experts and SequentialMLP);
 * Drop-Upcycling: ``expected_drop_cos`` (q^4 per_projection, q^2 shared, q = 1 - floor(rF)/F)
   within 0.02, at r = 0.5 and r = 1.0; at r = 0 (permuted neurons only) 1.0 within 1e-6, which
   a position-wise cosine of the flattened weights would not give;
 * from scratch: about 0 (|mean| < 0.02, every pair within 5/H);
and a real ``pretrain_moe.py`` run writes the metrics to metrics.jsonl at every log step
(``logging.expert_similarity: false`` turns them off).

Tolerance: the mean over the 28 pairs of 8 experts; a pair's cosine spreads by about
sqrt(q^n (1 - q^n) / F) (which neurons two experts keep) + 1/H (cross-neuron terms), i.e.
<= 0.02 at H = 128, F = 512, and the mean of 28 by less than half of that.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import cpu_megatron_module, run_cli, single_process_megatron
from tests.resilience import small_args

pytestmark = cpu_megatron_module()

from megatron.core import tensor_parallel  # noqa: E402

from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.conversion.keymaps import mcore_shapes  # noqa: E402
from megatron_ext.conversion.mcore_io import arch_from_config  # noqa: E402
from megatron_ext.model.builder import build_model, resolve_backends  # noqa: E402
from megatron_ext.training.callbacks.expert_similarity import (  # noqa: E402
    ExpertSimilarity,
    expected_drop_cos,
    expert_similarity,
)
from megatron_ext.upcycling import UpcycleSpec, upcycle_mcore  # noqa: E402

HIDDEN, FFN, EXPERTS, LAYERS = 128, 512, 8, 2
BASE = [
    f"model.num_layers={LAYERS}", f"model.hidden_size={HIDDEN}", "model.num_attention_heads=4",
    f"model.ffn_hidden_size={FFN}", "model.vocab_size=128", "model.max_position_embeddings=32",
    f"moe.num_experts={EXPERTS}", "train.precision=fp32", "data.seq_length=32",
]


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron()


def _dense_arch():
    return replace(arch_from_config(load_config(None, BASE)), num_experts=0,
                   moe_layers=frozenset())


@pytest.fixture(scope="module")
def dense() -> dict[str, torch.Tensor]:
    """A random dense model in mcore names (norms 1, weights N(0, 0.02))."""
    gen = torch.Generator().manual_seed(7)
    return {name: torch.ones(shape) if name.endswith("norm.weight") else
            torch.randn(shape, generator=gen) * 0.02
            for name, shape in mcore_shapes(_dense_arch()).items()}


def _upcycled(dense: dict, grouped: bool = True, **spec) -> torch.nn.Module:
    """The tiny MoE model holding ``upcycle_mcore``'s output (the upcycling library)."""
    cfg = load_config(None, [*BASE, f"moe.grouped_gemm={str(grouped).lower()}"])
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(cfg, resolve_backends(cfg, cuda=False))
    spec = UpcycleSpec(num_experts=EXPERTS, top_k=2, seed=3, **spec)
    state = dict(upcycle_mcore(dense.__getitem__, dense, _dense_arch(), spec))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    return model


def _layers(metrics: dict) -> list[int]:
    layers = sorted({int(k.split("/")[1][5:]) for k in metrics if k.startswith("moe/layer")})
    assert layers == list(range(LAYERS)), metrics  # 0-based, as the routing heatmaps
    return layers


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "sequential"])
def test_naive_is_exactly_one(dense, grouped: bool) -> None:
    metrics = expert_similarity(_upcycled(dense, grouped, method="naive"))
    for layer in _layers(metrics):
        for stat in ("mean", "min", "max"):
            assert metrics[f"moe/layer{layer}/expert_cos_{stat}"] == 1.0
    assert metrics["moe/expert_cos_mean"] == 1.0


@pytest.mark.parametrize("ratio, sharing", [
    (0.0, "per_projection"), (0.5, "per_projection"), (0.5, "shared"), (1.0, "per_projection"),
    (0.25, "shared"),
])
def test_drop_matches_formula(dense, ratio: float, sharing: str) -> None:
    metrics = expert_similarity(_upcycled(dense, method="drop", ratio=ratio,
                                          index_sharing=sharing))
    tol = 1e-6 if ratio == 0 else 0.02
    for layer in _layers(metrics):
        mlp = f"decoder.layers.{layer}.mlp."  # metric layer L is decoder.layers.L
        gate, up = dense[mlp + "linear_fc1.weight"].chunk(2)
        want = expected_drop_cos(gate, up, dense[mlp + "linear_fc2.weight"], ratio, sharing)
        got = metrics[f"moe/layer{layer}/expert_cos_mean"]
        assert abs(got - want) <= tol, (layer, got, want)
    # The formula's leading term: q^4 / q^2 (dense weights are random, so T ~ S).
    lead = (1 - int(ratio * FFN) / FFN) ** (4 if sharing == "per_projection" else 2)
    assert abs(metrics["moe/expert_cos_mean"] - lead) <= tol


def test_scratch_is_near_zero(dense) -> None:
    metrics = expert_similarity(_upcycled(dense, method="scratch"))
    assert abs(metrics["moe/expert_cos_mean"]) < 0.02
    for layer in _layers(metrics):
        assert -5 / HIDDEN < metrics[f"moe/layer{layer}/expert_cos_min"]
        assert metrics[f"moe/layer{layer}/expert_cos_max"] < 5 / HIDDEN


@pytest.mark.parametrize("enabled", [True, False])
def test_logging_switch(dense, enabled: bool) -> None:
    cfg = load_config(None, [*BASE, f"logging.expert_similarity={str(enabled).lower()}"])
    callback = ExpertSimilarity(SimpleNamespace(cfg=cfg, model=_upcycled(dense, method="naive")))
    metrics: dict[str, float] = {}
    callback.on_log(None, metrics)
    assert ("moe/expert_cos_mean" in metrics) == enabled
    assert len(metrics) == (3 * LAYERS + 1 if enabled else 0)


@pytest.mark.slow  # a real run: ~12 s idle, ~20 s on 2 shared cores
def test_metrics_reach_metrics_jsonl(tmp_path: Path) -> None:
    proc = run_cli(small_args(tmp_path, 3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "moe/expert_cos_mean" in r]
    assert len(train) == 3  # log_interval 1: every step
    for rec in train:
        for layer in (0, 1):
            lo, mean, hi = (rec[f"moe/layer{layer}/expert_cos_{s}"] for s in ("min", "mean", "max"))
            assert -1.0 <= lo <= mean <= hi <= 1.0
        assert abs(rec["moe/expert_cos_mean"]) < 0.1  # from scratch, two small steps
