"""tools/bench/throughput.py runs end to end on the CPU at a toy size (what the H100 run does,
minus the size): three variants measured, ratios, JSON/Markdown/profile written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

TOY = ["tools/bench/throughput.py", "--config", "configs/tiny-cpu.yaml",
       "--set", "data.demo_corpus=false", "--set", "data.mock=true",
       "--layers", "2", "--seq", "64", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]


ABLATIONS = ["ours+model.lm_loss=megatron", "ours+train.micro_batch_size=4",
             "ours+train.recompute=full"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[str, Path]:
    """One run measures the three variants and the ablations (+overrides), with --profile:
    (its stdout, its output directory). One process, not two: each costs a start-up."""
    out = tmp_path_factory.mktemp("bench") / "bench"
    variants = ",".join(["ours", "hf", "plain", *ABLATIONS])
    proc = run_cli([*TOY, "--variants", variants, "--out", str(out), "--profile"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out


def test_toy_benchmark_three_variants(bench: tuple[str, Path]) -> None:
    stdout, out = bench
    # The ratios are the last thing printed.
    assert stdout.strip().splitlines()[-1].startswith("ratios: ours/hf = ")

    res = json.loads((out / "throughput.json").read_text())
    assert list(res["variants"]) == ["ours", "hf", "plain", *ABLATIONS]
    for name, r in res["variants"].items():
        assert r["status"] == "ok", (name, r)
        assert r["tokens_per_s"] > 0 and r["model_tflops"] > 0 and r["peak_memory_gib"] > 0
        assert r["activations_gib"] > 0
        assert len(r["losses"]) == 2 and all(0 < x < 20 for x in r["losses"]), r["losses"]
    assert set(res["ratios"]) == {f"{n}/{base}" for n in ["ours", *ABLATIONS]
                                  for base in ("hf", "plain")}
    assert all(v > 0 for v in res["ratios"].values())
    assert "attention=sdpa experts=grouped" in res["variants"]["ours"]["backends"]
    assert "lm_loss=fused" in res["variants"]["ours"]["backends"]
    assert "attention=unfused experts=sequential dispatcher=allgather" in \
        res["variants"]["plain"]["backends"]
    assert "dispatcher=local" in res["variants"]["ours"]["backends"]
    # Same seed and CPU init give the plain spec the same weights as ours (the grouped experts
    # initialize in SequentialMLP's order): the losses agree although the kernels differ.
    ours, plain = res["variants"]["ours"]["losses"], res["variants"]["plain"]["losses"]
    assert abs(ours[0] - plain[0]) < 1e-3, (ours, plain)

    md = (out / "throughput.md").read_text()
    assert "| ours |" in md and "| hf |" in md and "| plain |" in md
    assert "megatron-core 0.16.1" in md and "--micro-batch 2" in md
    prof = (out / "profile.md").read_text()
    assert "## ours" in prof and "## hf" in prof and "| 1 | `" in prof
    # --profile profiles the variants without +overrides only
    assert not any(f"## {name}" in prof for name in ABLATIONS), prof[:2000]


def test_variant_subset_and_bad_variant(tmp_path: Path) -> None:
    proc = run_cli([*TOY, "--variants", "ours,nope"], timeout=120)
    assert proc.returncode == 2 and "--variants" in proc.stderr
    proc = run_cli([*TOY, "--variants", "ours+model.lm_loss"], timeout=120)
    assert proc.returncode == 2 and "+key=value" in proc.stderr


def test_ablation_variants_carry_their_overrides(bench: tuple[str, Path]) -> None:
    """Variants with +overrides run in the same process: the megatron loss head and a larger
    micro-batch, each against plain; same weights and tokens give the same first loss."""
    _, out = bench
    res = json.loads((out / "throughput.json").read_text())
    v = res["variants"]
    assert "lm_loss=fused" in v["ours"]["backends"]
    assert "lm_loss=megatron" in v["ours+model.lm_loss=megatron"]["backends"]
    assert "lm_loss=megatron" in v["plain"]["backends"]
    assert v["ours+train.micro_batch_size=4"]["micro_batch"] == 4 and v["ours"]["micro_batch"] == 2
    assert abs(v["ours"]["losses"][0] - v["ours+model.lm_loss=megatron"]["losses"][0]) < 1e-4
    # Activations kept by one forward: twice the micro-batch about doubles them, full
    # recompute keeps only layer inputs. (The fp32 logits copy of megatron's loss head shows
    # only in bf16: tools/bench/lm_loss.py measures it.)
    acts = {name: r["activations_gib"] for name, r in v.items()}
    assert 1.8 < acts["ours+train.micro_batch_size=4"] / acts["ours"] < 2.2, acts
    assert acts["ours+train.recompute=full"] < acts["ours"] / 2, acts
    assert abs(v["ours+train.recompute=full"]["losses"][0] - v["ours"]["losses"][0]) < 1e-5
    assert "| ours+train.micro_batch_size=4 | 4 |" in (out / "throughput.md").read_text()


def test_lm_loss_bench_compares_paths(tmp_path: Path) -> None:
    """tools/bench/lm_loss.py at a toy size: every path runs and agrees with megatron's."""
    out = tmp_path / "lm_loss.json"
    args = ["tools/bench/lm_loss.py", "--tokens", "64", "--hidden", "16", "--vocab", "1000",
            "--repeats", "1", "--out", str(out)]
    proc = run_cli(args, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res["paths"]) == ["megatron", "megatron-fused", "ours", "ours-compiled"]
    for name, r in res["paths"].items():
        assert r["status"] == "ok", (name, r)
        assert r["grad_w_rel_diff"] < 2e-2 and r["loss_max_abs_diff"] < 5e-2, (name, r)
    bad = run_cli([*args[:1], "--paths", "ours,nope"], timeout=60)
    assert bad.returncode == 2 and "--paths" in bad.stderr
