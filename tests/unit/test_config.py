"""Config loading, overrides, strict validation, and every shipped YAML."""

import pytest

from megatron_ext.config.loader import ConfigError, load_config, parse_override, to_yaml
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import validate
from megatron_ext.model.params import count_params
from tests.conftest import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_validate():
    validate(Config())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    validate(cfg)
    # The YAML dump reloads to the same tree (what --print-config and checkpoints save).
    tmp = REPO / ".pytest_cache" / f"roundtrip-{path.name}"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_text(to_yaml(cfg))
    assert load_config(tmp) == cfg


def test_overrides_parse_yaml_scalars():
    cfg = load_config(REPO / "configs/tiny-cpu.yaml",
                      ["optimizer.lr=1e-4", "moe.z_loss_coeff=0.001", "moe.layer_freq=[1,0,1,0]",
                       "logging.wandb.mode=offline", "data.cache_dir=null"])
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.moe.z_loss_coeff == pytest.approx(1e-3)
    assert cfg.moe.layer_freq == [1, 0, 1, 0]
    assert cfg.logging.wandb.mode == "offline"
    assert parse_override("a.b=true") == ("a.b", True)


@pytest.mark.parametrize("override, message", [
    ("moe.foo=1", "moe.foo: unknown key"),
    ("nosuch.key=1", "nosuch: unknown key"),
    ("model.hidden_size=abc", "model.hidden_size: expected an integer"),
    ("train.precision=fp16", "train.precision: 'fp16' is not one of"),
    ("optimizer.lr=true", "optimizer.lr: expected a number"),
    ("train.train_steps=abc", "train.train_steps: expected an integer or null, got 'abc'"),
])
def test_type_and_key_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(REPO / "configs/tiny-cpu.yaml", [override])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.expert=3", "parallel.world_size=3"],
     "parallel.expert: num_experts=8 is not divisible by expert=3"),
    (["parallel.tensor=3", "parallel.world_size=3"], "parallel.tensor: num_attention_heads=4"),
    (["model.num_kv_heads=3"], "model.num_kv_heads: num_attention_heads=4 is not divisible"),
    (["moe.top_k=9"], "moe.top_k: top_k=9 must be between 1 and num_experts=8"),
    (["train.global_batch_size=12"], "train.global_batch_size: 12 is not divisible"),
    (["parallel.expert=2", "parallel.world_size=1"], "parallel.expert: data-parallel size 1"),
    (["parallel.expert=4", "parallel.world_size=2"], "parallel.expert: data-parallel size 2"),
    (["moe.layer_freq=[1,0]"], "moe.layer_freq: has 2 entries, expected num_layers=4"),
    (["moe.capacity_factor=0"], "moe.capacity_factor: must be > 0"),
    (["data.seq_length=1024"], "data.seq_length: 1024 exceeds"),
    (["optimizer.min_lr=1.0"], "optimizer.min_lr"),
    (["train.global_batch_size=0"], "train.global_batch_size: must be >= 1"),
    (["schedule.decay_steps=-5", "schedule.warmup_steps=0"], "schedule.decay_steps: must be >= 1"),
    (["schedule.warmup_steps=400"], "schedule.warmup_steps: 400 must be 0 or less than the decay"),
    (["schedule.warmup_steps=100", "train.train_steps=100"], "schedule.warmup_steps: 100 must"),
    (["parallel.tensor=3", "model.num_attention_heads=3", "model.num_kv_heads=3",
      "model.hidden_size=96", "model.ffn_hidden_size=96", "parallel.world_size=3"],
     "model.vocab_multiple: 128 is not divisible by tensor=3"),
    (["upcycling.ratio=1.5"], "upcycling.ratio: must be <= 1, got 1.5"),
    (["moe.num_experts=0", "parallel.expert=2", "parallel.world_size=2"],
     "parallel.expert: expert parallelism needs"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel: needs tensor > 1"),
    (["moe.token_dispatcher=local", "parallel.expert=2", "parallel.world_size=2"],
     "moe.token_dispatcher: local needs parallel.expert=1"),
    (["moe.token_dispatcher=local", "moe.capacity_factor=1.0"],
     "moe.token_dispatcher: local is dropless"),
    (["parallel.tensor=2", "parallel.world_size=2"],
     "parallel.sequence_parallel: megatron-core needs it for MoE with tensor > 1"),
])
def test_impossible_combinations(overrides, message):
    """Single-field bounds fail at load_config (every Config is built checked), cross-field
    rules at validate: either way one ConfigError naming the field."""
    with pytest.raises(ConfigError) as e:
        validate(load_config(REPO / "configs/tiny-cpu.yaml", overrides))
    assert message in str(e.value)


def _one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nope.yaml"], "config error: config file not found: configs/nope.yaml"),
    (["--config", "configs/tiny-cpu.yaml", "--set", "moe.bogus=1"],
     "config error: moe.bogus: unknown key"),
    (["--config", "configs/tiny-cpu.yaml", "--set", "moe.top_k=9"], "config error: moe.top_k"),
    (["--config", "configs/tiny-cpu.yaml", "--set", "data.demo_corpus=false",
      "--set", "data.blend=[/nonexistent/x]", "--set", "data.tokenizer=/nonexistent/tok"],
     "config error: data.tokenizer: not found: /nonexistent/tok"),
    (["--config", "configs/tiny-cpu.yaml", "--set", "model.vocab_size=1000"],
     "error: tokenizer vocab size 4096 exceeds the model's padded vocab size 1024"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message, tmp_path):
    proc = run_cli(["pretrain_moe.py", *args, "--set", f"logging.output_dir={tmp_path}/run"])
    assert proc.returncode == 2, proc.stderr
    assert _one_error_line(proc).startswith(message)
    assert not (tmp_path / "run").exists()  # nothing written before validation passes


def test_print_config_is_resolved_yaml(tmp_path):
    proc = run_cli(["pretrain_moe.py", "--config", "configs/8x152M.yaml", "--set",
                    "optimizer.lr=1e-4", "--print-config"])
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "resolved.yaml"
    out.write_text(proc.stdout)
    cfg = load_config(out)
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.model.hidden_size == 512 and cfg.moe.num_experts == 8


@pytest.mark.parametrize("name, total_b, active_b", [
    ("8x152M", 0.42, 0.19), ("8x1.5B", 8.96, 2.62), ("8x3.7B", 18.6, 5.90),
])
def test_paper_parameter_counts(name, total_b, active_b):
    cfg = load_config(REPO / f"configs/{name}.yaml")
    c = count_params(cfg.model, cfg.moe)
    assert c.total / 1e9 == pytest.approx(total_b, rel=0.02)
    assert c.active / 1e9 == pytest.approx(active_b, rel=0.02)


def test_dry_run_reports_counts():
    proc = run_cli(["pretrain_moe.py", "--config", "configs/8x152M.yaml", "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "total 0.417B" in proc.stdout and "active per token 0.190B" in proc.stdout
    assert "layout: world 8 = tp 1 x pp 1 x dp 8; ep 1" in proc.stdout
    assert "memory per GPU" in proc.stdout
    assert "416,608,768 parameters (matches the count above)" in proc.stdout


def test_every_field_is_documented_and_docs_are_current():
    import dataclasses

    from megatron_ext.config.docs import field_docs, render, sections

    for name, cls in sections():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{name}.{f.name} has no docstring"
    assert (REPO / "docs/config.md").read_text() == render(), \
        "regenerate: python -m megatron_ext.config.docs > docs/config.md"


def test_training_launch_is_validated_against_its_real_world_size():
    """The config's parallel.world_size is the plan for --dry-run; a launch with 4 processes is
    checked as 4 (8 experts at EP=8 cannot run on 4 ranks)."""
    args = ["pretrain_moe.py", "--config", "configs/8x1.5B.yaml", "--set", "data.mock=true"]
    proc = run_cli(args, env={"WORLD_SIZE": "4", "RANK": "0"})
    assert proc.returncode == 2
    assert _one_error_line(proc) == (
        "config error: parallel.expert: data-parallel size 4 (world 4 / tensor*pipeline) is not "
        "divisible by expert=8")
    dry = run_cli([*args, "--dry-run"], env={"WORLD_SIZE": "4", "RANK": "0"})
    assert dry.returncode == 0 and "layout: world 32" in dry.stdout


@pytest.mark.parametrize("overrides, cuda, want", [
    # no EP/TP: nothing to exchange, our sync-free local permutation (dropless only)
    ([], True, ("local", "fused", True)),
    ([], False, ("local", "fused", False)),
    (["moe.capacity_factor=1.0"], True, ("alltoall", "fused", True)),
    (["parallel.expert=2"], True, ("alltoall", "fused", True)),
    (["parallel.tensor=2"], True, ("alltoall", "fused", True)),
    (["parallel.expert=2"], False, ("allgather", "fused", False)),  # gloo: no alltoall
    (["moe.token_dispatcher=alltoall", "model.kernel_fusion=false"], True,
     ("alltoall", "fused", False)),
    (["model.lm_loss=megatron", "model.kernel_fusion=true"], False, ("local", "megatron", True)),
])
def test_backend_resolution(overrides, cuda, want):
    from megatron_ext.model.builder import resolve_backends

    cfg = load_config(REPO / "configs/tiny-cpu.yaml", overrides)
    b = resolve_backends(cfg, cuda=cuda)
    assert (b.dispatcher, b.lm_loss, b.fusion) == want
    assert f"lm_loss={want[1]}" in b.describe()
