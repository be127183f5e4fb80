"""Sparse-Upcycling options: interleaved dense/MoE layers and capacity-limited routing."""

import json
import textwrap

from megatron_ext.config.derived import moe_layer_pattern
from megatron_ext.config.loader import load_config
from megatron_ext.model.params import count_params
from tests.conftest import REPO, run_cli
from tests.resilience import small_args


def test_layer_freq_patterns_and_param_counts():
    cfg = load_config(REPO / "configs/8x152M.yaml", ["moe.layer_freq=2"])
    assert moe_layer_pattern(cfg.model, cfg.moe) == [1, 0] * 6
    full_cfg = load_config(REPO / "configs/8x152M.yaml")
    full = count_params(full_cfg.model, full_cfg.moe)
    half = count_params(cfg.model, cfg.moe)
    mlp = 3 * 512 * 2048
    assert half.moe_layers == 6 and half.dense_mlp == 6 * mlp
    assert full.total - half.total == 6 * (8 * mlp + 8 * 512) - 6 * mlp
    assert full.active - half.active == 6 * (2 * mlp + 8 * 512) - 6 * mlp
    explicit = load_config(REPO / "configs/8x152M.yaml", [f"moe.layer_freq={[0, 1] * 6}"])
    assert moe_layer_pattern(explicit.model, explicit.moe) == [0, 1] * 6


def test_four_layers_every_second_moe_trains(tmp_path):
    proc = run_cli(small_args(tmp_path, 4, "--set", "model.num_layers=4",
                              "--set", "moe.layer_freq=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()][-1]
    moe_layers = {k.split("/")[1] for k in last if k.startswith("moe/layer")}
    assert moe_layers == {"layer0", "layer2"}  # 0-based, as layer_freq [1, 0, 1, 0]
    assert "moe/layer1/load_e0" not in last


CAPACITY = textwrap.dedent("""
    import math, torch
    from megatron_ext.config.loader import load_config
    from megatron_ext.model.builder import build_model, resolve_backends
    from megatron_ext.platform.dist import init_distributed, shutdown
    from megatron_ext.training.router_stats import RouterStats
    from megatron.core.transformer.moe.router import TopKRouter

    cfg = load_config("configs/tiny-cpu.yaml", ["moe.capacity_factor=1.0", "model.num_layers=1",
                      "data.mock=true", "data.demo_corpus=false"])
    init_distributed(cfg)
    model = build_model(cfg, resolve_backends(cfg))
    router = next(m for m in model.modules() if isinstance(m, TopKRouter))
    with torch.no_grad():  # skew: experts 0 and 1 score highest for every token
        router.weight.normal_(0, 0.01)
    inputs = []
    router.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    stats = RouterStats(model, cfg.moe.top_k)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 64))
    h = model.embedding.word_embeddings.weight  # make expert 0/1 preferred for any input:
    with torch.no_grad():
        router.weight[0] += 0.5 * torch.sign(h.mean(0))
    model(tokens, torch.arange(64).expand(4, -1), None, labels=tokens).sum().backward()
    measured = stats.collect()["moe/layer0/dropped_frac"]

    x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
    logits = x @ router.weight.float().t()
    top = torch.topk(logits, cfg.moe.top_k, dim=-1).indices
    counts = torch.bincount(top.flatten(), minlength=cfg.moe.num_experts)
    n_assign = top.numel()
    capacity = math.ceil(n_assign / cfg.moe.num_experts * cfg.moe.capacity_factor)
    expected = (counts - capacity).clamp(min=0).sum().item() / n_assign
    print("DROPPED", measured, expected, counts.tolist(), capacity)
    assert expected > 0.05, counts
    assert abs(measured - expected) < 1e-9, (measured, expected)
    shutdown()
""")


def test_capacity_dropped_fraction_matches_direct_count(tmp_path):
    script = tmp_path / "cap.py"
    script.write_text(CAPACITY)
    proc = run_cli([str(script)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DROPPED" in proc.stdout


def test_capacity_training_logs_dropped_fraction(tmp_path):
    proc = run_cli(small_args(tmp_path, 3, "--set", "moe.capacity_factor=1.0",
                              "--set", "moe.pad_to_capacity=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= rec["moe/dropped_frac"] < 1.0
    assert "moe/layer0/dropped_frac" in rec
