"""moe-upcycle --config: the experts, top-k, MoE layers and the ``upcycling`` section
come from the training config that will load the result (``--set`` overrides it, explicit flags
override both), so an upcycled checkpoint cannot disagree with that run; a config whose model
shape disagrees with the dense input, or that cannot be an MoE run, is one line and exit 2 with
nothing written. The tool on a tiny dense Llama checkpoint: in this process (its ``main``, as
the console script runs it; a subprocess would cost seconds of imports each) but for the mcore
output and one bad config, which run as real subprocesses."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from megatron_ext.config.loader import load_config
from megatron_ext.conversion.mcore_io import arch_from_config
from tests.conftest import run_cli

CLI = ["-m", "megatron_ext.cli.upcycle"]
# The tiny dense model's shape, as a training config names it.
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
         "ffn_hidden_size": 128, "vocab_size": 256}
RUN = {"train": {"train_steps": 10, "global_batch_size": 1, "micro_batch_size": 1},
       "data": {"mock": True, "seq_length": 32}}
NOISE = {"method": "noise", "ratio": 0.25, "seed": 7, "index_sharing": "shared",
         "router_init": "normal_std002", "noise_std": 0.05}
DROP = {"method": "drop", "ratio": 0.75, "seed": 11, "index_sharing": "per_projection",
        "router_init": "uniform_std002", "noise_std": 0.02}


@pytest.fixture(scope="module")
def dense(hf_llama: Path) -> Path:
    """The shared tiny HF Llama (tests/conftest.py)."""
    return hf_llama


def _config(tmp_path: Path, moe: dict, upcycling: dict, **model) -> Path:
    path = tmp_path / "run.yaml"
    tree = {"model": {**MODEL, **model}, "moe": moe, "upcycling": upcycling, **RUN}
    path.write_text(yaml.safe_dump(tree))
    return path


def _argv(dense: Path, out: Path, *args: str | Path) -> list[str]:
    return ["--input", str(dense), "--output", str(out), "--skip-validation", *map(str, args)]


def _upcycle(dense: Path, out: Path, *args: str | Path):
    """The tool as a real subprocess."""
    return run_cli([*CLI, *_argv(dense, out, *args)], timeout=300)


def _upcycle_here(capsys, dense: Path, out: Path, *args: str | Path) -> SimpleNamespace:
    """The tool's ``main`` in this process: its exit code and what it printed."""
    from megatron_ext.cli import upcycle

    capsys.readouterr()
    code = upcycle.main(_argv(dense, out, *args))
    seen = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=seen.out, stderr=seen.err)


def _recipe(out: Path) -> dict:
    return json.loads((out / "upcycling.json").read_text())


CONFIGS = {
    # interleaved layers (layer 0 stays dense), the noise method, every upcycling field set
    "noise, layer list": ({"num_experts": 4, "top_k": 1, "layer_freq": [0, 1]}, NOISE, [],
                          {**NOISE, "num_experts": 4, "top_k": 1, "moe_layers": [1]}),
    # every layer MoE; --set changes a field of the config as pretrain_moe.py --set would
    "drop, --set": ({"num_experts": 2, "top_k": 2, "layer_freq": 1}, DROP,
                    ["--set", "upcycling.seed=5", "--set", "moe.num_experts=4"],
                    {**DROP, "seed": 5, "num_experts": 4, "top_k": 2, "moe_layers": None}),
    # btx from the config, its other sources by flag (the input itself stands in for a branch)
    "btx, --btx-sources": ({"num_experts": 4, "top_k": 2, "layer_freq": 1}, {"method": "btx"},
                           ["--btx-sources", "{dense}"],
                           {"method": "btx", "num_experts": 4, "top_k": 2, "moe_layers": None}),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_config_supplies_the_recipe(dense: Path, tmp_path: Path, capsys, case: str) -> None:
    moe, upcycling, extra, expected = CONFIGS[case]
    out = tmp_path / "moe"
    extra = [x.format(dense=dense) for x in extra]
    r = _upcycle_here(capsys, dense, out, "--config", _config(tmp_path, moe, upcycling), *extra)
    assert r.returncode == 0, r.stderr
    recipe = _recipe(out)
    assert {k: recipe[k] for k in expected} == expected
    hf = json.loads((out / "config.json").read_text())
    assert hf["num_local_experts"] == expected["num_experts"]
    assert hf["num_experts_per_tok"] == expected["top_k"]
    dense_layers = sorted(set(range(2)) - set(expected["moe_layers"] or range(2)))
    assert sorted(hf.get("mlp_only_layers") or []) == dense_layers


def test_flags_override_the_config(dense: Path, tmp_path: Path, capsys) -> None:
    config = _config(tmp_path, {"num_experts": 4, "top_k": 1, "layer_freq": [0, 1]}, NOISE)
    out = tmp_path / "moe"
    r = _upcycle_here(capsys, dense, out, "--config", config, "--method", "naive",
                      "--num-experts", "2", "--top-k", "2", "--seed", "99", "--moe-layers", "0,1")
    assert r.returncode == 0, r.stderr
    recipe = _recipe(out)
    assert (recipe["method"], recipe["num_experts"], recipe["top_k"], recipe["seed"],
            recipe["moe_layers"]) == ("naive", 2, 2, 99, [0, 1])
    # the fields no flag named still come from the config
    assert (recipe["ratio"], recipe["index_sharing"], recipe["router_init"],
            recipe["noise_std"]) == (0.25, "shared", "normal_std002", 0.05)


@pytest.mark.slow  # a megatron checkpoint save: ~20-30 s on 2 busy cores
def test_mcore_output_has_the_shape_of_the_run(dense: Path, tmp_path: Path) -> None:
    """The megatron checkpoint's saved config describes the configured model: same tensors
    (keymaps.Arch: shape, experts, MoE layers) and the same top-k."""
    config = _config(tmp_path, {"num_experts": 4, "top_k": 1, "layer_freq": [0, 1]}, NOISE)
    out = tmp_path / "moe"
    r = _upcycle(dense, out, "--config", config, "--output-format", "mcore")
    assert r.returncode == 0, r.stderr
    saved, run = load_config(out / "config.yaml"), load_config(config)
    assert arch_from_config(saved) == arch_from_config(run)
    assert saved.moe.top_k == run.moe.top_k == 1


MOE = {"num_experts": 4, "top_k": 2}
BAD = {
    "hidden size": ({"hidden_size": 128}, [], "model.hidden_size 128 vs 64"),
    "layers and ffn": ({"num_layers": 3, "ffn_hidden_size": 256}, [],
                       "model.num_layers 3 vs 2"),
    "vocab by --set": ({}, ["--set", "model.vocab_size=512"], "model.vocab_size 512 vs 256"),
    "kv heads": ({"num_kv_heads": 4}, [], "model.num_kv_heads 4 vs 2"),
    "dense config": ({}, ["--set", "moe.num_experts=0"], "moe.num_experts is 0"),
    "unknown key": ({}, ["--set", "upcycling.ratoi=0.5"], "ratoi"),
    "bad recipe": ({}, ["--set", "upcycling.ratio=1.5"], "ratio"),
    "btx, no sources": ({}, ["--set", "upcycling.method=btx"], "btx needs at least one other"),
    "btx, 3 sources": ({}, ["--set", "upcycling.method=btx", "--btx-sources", "{dense}",
                            "{dense}"], "num_experts 4 is not divisible by the 3 btx source"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_exits_2_with_one_line(dense: Path, tmp_path: Path, capsys,
                                          case: str) -> None:
    model, extra, match = BAD[case]
    extra = [x.format(dense=dense) for x in extra]
    out = tmp_path / "moe"
    args = (dense, out, "--config", _config(tmp_path, MOE, DROP, **model), *extra)
    # One real process (import-time warnings would add lines), the rest in this one (fast).
    r = _upcycle(*args) if case == "hidden size" else _upcycle_here(capsys, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written
