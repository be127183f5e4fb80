"""moe-compare-inits runs the paper's comparison end to end, each stage a real
subprocess of our CLIs, and is resumable:

* a shortened run (dense base, naive and drop:0.5, a few steps of a tiny model) goes through every
  stage; the report holds every method's final losses on each validation set, its routing
  table and its expert-similarity curve (naive starting at ~1, drop:0.5 near (1-r)^4), the plot,
  and each stage's exact command, wall time and tokens (also in stages.json); the training runs
  differ only in their checkpoint paths and ``checkpoint.load``;
* a rerun skips every stage; a run stopped in a training stage (SIGTERM to the tool) resumes
  that training from its newest checkpoint and skips what had finished (a kill -9 instead: see
  the btx test's docstring);
* btx trains one branch of the dense base per demo domain (on that domain alone) and mixes the
  base and the branches into the MoE (its plan; and run for real from the first run's dense
  base, as the run whose training is stopped and resumed);
* bad input (unknown or malformed method, a bad config, a stage whose own config fails, a dense
  base whose shape or kind does not match the config, an output dir holding something else) is
  one line and exit 2, with nothing touched.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from megatron_ext.config.loader import load_config
from megatron_ext.experiments.plan import Experiment, build_stages, parse_methods
from megatron_ext.experiments.report import read_metrics
from tests.compare_runs import TINY, TOKENS_PER_STEP, compare, in_process, one_error_line
from tests.conftest import run_cli
from tests.forkrun import run_clis
from tests.resilience import popen, wait_for_line

RUN_EXTRA = ("--tasks", "demo_en_mc", "--eval-limit", "8")  # the shortened run's downstream task


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One shortened comparison, in a directory that held a foreign file (--overwrite)."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    out.mkdir()
    (out / "foreign.txt").write_text("not an experiment")
    start = time.monotonic()
    proc = in_process(compare(out, "--overwrite", *RUN_EXTRA))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "wall": time.monotonic() - start}


@pytest.mark.slow
def test_every_stage_runs_and_the_report_holds_every_number(run) -> None:
    out = run["out"]
    assert not (out / "foreign.txt").exists()  # --overwrite replaced the foreign directory
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [s["name"] for s in stages] == [
        "dense", "init/naive", "train/naive", "eval/naive", "routing/naive",
        "init/drop:0.5", "train/drop:0.5", "eval/drop:0.5", "routing/drop:0.5"]
    assert all(s["state"] == "ran" and s["wall_s"] > 0 for s in stages)
    by_name = {s["name"]: s for s in stages}
    assert by_name["dense"]["tokens"] == 2 * TOKENS_PER_STEP
    assert by_name["train/naive"]["tokens"] == 4 * TOKENS_PER_STEP
    assert "moe.num_experts=0" in by_name["dense"]["command"]
    assert "upcycling.method=drop" in by_name["init/drop:0.5"]["command"]
    # Identical training runs but for where they save and what they load.
    naive, drop = (by_name[f"train/{m}"]["command"] for m in ("naive", "drop:0.5"))
    differ = [(a, b) for a, b in zip(naive, drop, strict=True) if a != b]
    assert all("checkpoint." in a or "logging.output_dir" in a for a, _ in differ), differ

    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["naive", "drop:0.5"]
    for label, row in report["methods"].items():
        for key in ("train", "val_loss", "english/loss", "japanese/loss", "code/loss"):
            assert 0 < row["final"][key] < 20, (label, key)
        assert len(row["series"]["train"]) == 4 and row["series"]["train"][-1][0] == 1024
        assert len(row["series"]["cos"]) == 4
        assert set(row["routing"]["average"]) >= {"mean_tv", "usage_entropy"}
        assert 0 <= row["tasks"]["demo_en_mc/acc"] <= 1, row["tasks"]
        slug = label.replace(":", "_r")
        assert row["heatmaps"] == [f"routing/{slug}/heatmap_layer{i}.png" for i in (0, 1)]
    # After one step, naive experts are still nearly identical; drop:0.5 near (1 - 0.5)^4.
    assert report["methods"]["naive"]["final"]["cos_first"] > 0.98
    assert abs(report["methods"]["drop:0.5"]["final"]["cos_first"] - 0.0625) < 0.05
    md = (out / "report.md").read_text()
    for needle in ("| naive |", "| drop:0.5 |", "english/loss", "mean_tv", "curves.png",
                   "python -m megatron_ext.cli.upcycle", "python -m megatron_ext.cli.routing",
                   "Drop-Upcycling r=0.5",  # the paper's row beside ours
                   "](routing/drop_r0.5/heatmap_layer1.png)", "## Downstream tasks",
                   "demo_en_mc/acc", "--limit 8"):
        assert needle in md, needle
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for domain in ("en_shakespeare", "ja_neko", "code_python"):  # held-out text, per domain
        assert (out / "heldout" / f"{domain}.txt").stat().st_size > 1000


@pytest.fixture(scope="module")
def quick(run, tmp_path_factory) -> dict:
    """The tool's quick runs on and beside the first run's output, forked from one driver
    (tests/forkrun.py: one interpreter start-up for all): each refusal, then a rerun."""
    out, tmp = run["out"], tmp_path_factory.mktemp("quick")
    mine = tmp / "mine"  # a directory of the user's, not an experiment
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    calls = {
        "dense/shape": compare(tmp / "shape", "--set", "model.ffn_hidden_size=192",
                               dense=["--dense", str(out / "dense" / "ckpt")]),
        "dense/moe": compare(tmp / "moe", dense=["--dense", str(out / "init" / "naive")]),
        "dense/missing": compare(tmp / "missing", dense=["--dense", str(tmp / "nowhere")]),
        "other/tokens": compare(out, *RUN_EXTRA, steps=6),
        "other/methods": compare(out, *RUN_EXTRA, methods="naive"),
        "other/foreign": compare(mine),
        "rerun": compare(out, *RUN_EXTRA),  # last: the refusals must find the first run as is
    }
    listing = {d: sorted(p.name for p in d.iterdir()) for d in (out, mine)}
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "train").rglob("*") if p.is_file()}
    start = time.monotonic()
    procs = run_clis(list(calls.values()), tmp / "forkrun")
    return {"tmp": tmp, "mine": mine, "listing": listing, "mtimes": mtimes,
            "wall": time.monotonic() - start, **dict(zip(calls, procs, strict=True))}


@pytest.mark.slow
def test_rerun_skips_every_stage(run, quick) -> None:
    out, proc = run["out"], quick["rerun"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert all(s["state"] == "skipped (verified)" for s in stages), stages
    assert all(s["wall_s"] > 0 for s in stages)  # the first run's times are kept
    assert "| step" not in proc.stdout  # nothing trained
    mtimes = quick["mtimes"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert json.loads((out / "report.json").read_text())["methods"]["naive"]["final"]
    # the rerun and the six refusals before it, together
    assert quick["wall"] < 0.5 * run["wall"], (quick["wall"], run["wall"])


@pytest.mark.slow
def test_btx_then_its_stopped_training_resumes_from_its_checkpoint(run, tmp_path: Path) -> None:
    """btx from the first run's dense base (given: --dense of ours): a branch per demo domain,
    each trained on its own domain only, mixed with the base by the upcycler; its training
    stopped as a user stops it, and the rerun resumes it from the checkpoint it saved as it
    stopped and skips what had finished (one chain of runs: each rerun costs process start-ups,
    so the btx run and the resumed one are the same).

    A scheduler's kill -9 instead: the rerun takes the same path (runner.is_done reads only the
    outputs, not how the tool stopped), and a training killed with -9 resumes from its newest
    save: tests/distributed/test_preemption.py (bit-identically) and tests/unit/test_rerun.py."""
    out = tmp_path / "cmp"
    args = compare(out, "--btx-tokens", str(2 * TOKENS_PER_STEP), methods="btx", steps=6,
                   dense=["--dense", str(run["out"] / "dense" / "ckpt")])
    ckpt = out / "train" / "btx" / "ckpt"
    before = ["branch/code", "branch/en", "branch/ja", "init/btx"]  # the stages before it

    # scancel/Ctrl-C of the tool alone: the training it runs saves its step and stops (step 3
    # falls between checkpoint.save_interval=2's saves).
    proc = popen(args)
    wait_for_line(proc, lambda line: "| step 3/6" in line, timeout=900)
    proc.send_signal(signal.SIGTERM)
    tail = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143 and "error: terminated" in tail, tail[-2000:]
    termed = int(sorted(ckpt.glob("iter_*"))[-1].name[5:])
    assert 3 <= termed < 6
    ledger = json.loads((out / "stages.json").read_text())["stages"]
    assert [(s["name"], s["state"]) for s in ledger] == [(n, "ran") for n in before]

    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-2000:]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [(s["name"], s["state"]) for s in stages] == [
        *((n, "skipped (verified)") for n in before), ("train/btx", "ran"), ("routing/btx", "ran")]
    log = (out / "logs" / "train_btx.log").read_text()  # every leg appends to it
    resumes = [line for line in log.splitlines() if f"resumed from {ckpt}" in line]
    assert [r.rsplit(" at step ", 1)[-1] for r in resumes] == [str(termed)], \
        log[-2000:]  # resumed from the stop's save, not started over
    assert "| step 6/6" in again.stdout and f"| step {termed}/6" not in again.stdout
    # That a finished experiment reruns nothing: test_rerun_skips_every_stage.

    for domain in ("code", "en", "ja"):  # each branch trained on its own domain only
        branch = out / "branch" / domain / "run"
        assert load_config(branch / "config.yaml").data.blend == [f"demo:{domain}"]
        assert read_metrics(branch / "metrics.jsonl")["train"][-1][0] == 2 * TOKENS_PER_STEP
    recipe = json.loads((out / "init" / "btx" / "upcycling.json").read_text())
    assert recipe["method"] == "btx" and len(recipe["btx_sources"]) == 3
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["methods"]["btx"]["final"]["english/loss"] < 20
    assert "| btx |" in (out / "report.md").read_text()


@pytest.mark.parametrize("methods, needle", [
    ("naive,bogus", "unknown method 'bogus'"), ("drop", "drop needs a ratio"),
    ("drop:1.5", "ratio must be a number in [0, 1]"), ("naive:0.5", "naive takes no ratio"),
    ("btx:2", "btx takes no ratio"), ("naive,naive", "given twice"), ("", "unknown method ''"),
])
def test_bad_method_is_one_line(tmp_path: Path, methods: str, needle: str) -> None:
    proc = in_process(compare(tmp_path / "cmp", methods=methods))
    assert needle in one_error_line(proc)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["shape", "moe", "missing"])
def test_mismatched_dense_base_is_one_line(quick, case: str) -> None:
    needle = {"shape": "ffn_hidden_size 192 vs 128", "moe": "an MoE checkpoint (8 experts)",
              "missing": "nowhere"}[case]
    line = one_error_line(quick[f"dense/{case}"])
    assert needle in line and "--dense" in line, line
    assert not (quick["tmp"] / case).exists()


@pytest.mark.slow
@pytest.mark.parametrize("change", ["tokens", "methods", "foreign"])
def test_output_of_another_experiment_is_refused(run, quick, change: str) -> None:
    out = quick["mine"] if change == "foreign" else run["out"]
    line = one_error_line(quick[f"other/{change}"])
    assert f"--output {out}" in line and "--overwrite" in line, line
    # (the rerun after it adds no name either)
    assert sorted(p.name for p in out.iterdir()) == quick["listing"][out]


@pytest.mark.parametrize("extra, needle", [
    (["--set", "train.bogus=1"], "train.bogus: unknown key"),
    (["--set", "train.micro_batch_size=3"], "not divisible"),
    (["--set", "moe.num_experts=0"], "moe.num_experts is 0"),
    (["--tokens", "0"], "argument --tokens: must be >= 1"),
    (["--nproc-per-node", "3"], "not divisible"),  # 8 sequences a step over 3 processes
])
def test_bad_config_is_one_line(tmp_path: Path, extra: list[str], needle: str) -> None:
    proc = in_process(compare(tmp_path / "cmp", *extra))
    assert needle in one_error_line(proc)
    assert not (tmp_path / "cmp").exists()


def test_cli_args_make_the_same_experiment() -> None:
    """A SLURM job re-runs the tool with ``Experiment.cli_args()``: every field survives."""
    from megatron_ext.cli.compare_inits import parse_args

    sets = [a for a in TINY[2:] if a != "--set"] + ["train.micro_batch_size=4"]
    exp = Experiment(Path("configs/tiny-cpu.yaml"), sets, parse_methods("naive,drop:0.5,btx"),
                     4096, Path("/nonexistent/out"), dense_tokens=2048, tasks="demo_en_mc",
                     eval_limit=8, routing_tokens=500, btx_tokens=1024, procs=2)
    a = parse_args(exp.cli_args())
    again = Experiment(a.config, a.overrides, parse_methods(a.methods), a.tokens, a.output,
                       dense=a.dense, dense_tokens=a.train_dense or 0, tasks=a.tasks,
                       eval_limit=a.eval_limit, routing_tokens=a.routing_tokens,
                       btx_tokens=a.btx_tokens, procs=a.nproc_per_node)
    assert again.fingerprint() == exp.fingerprint() and again.procs == 2


def test_btx_plan_branches_the_base_per_domain() -> None:
    sets = [a for a in TINY[2:] if a != "--set"]
    exp = Experiment(Path("configs/tiny-cpu.yaml"), sets, parse_methods("btx"),
                     4 * TOKENS_PER_STEP, Path("/nonexistent/out"), dense_tokens=512,
                     btx_tokens=2 * TOKENS_PER_STEP)
    stages = {s.name: s for s in build_stages(exp)}
    assert list(stages) == ["dense", "branch/code", "branch/en", "branch/ja", "init/btx",
                            "train/btx", "routing/btx"]
    dense = "/nonexistent/out/dense/ckpt"
    for domain in ("code", "en", "ja"):
        argv = stages[f"branch/{domain}"].argv
        for setting in ("moe.num_experts=0", f"data.blend=[demo:{domain}]",
                        "train.train_steps=2", f"checkpoint.load={dense}"):
            assert setting in argv, (domain, setting)
        assert stages[f"branch/{domain}"].needs == ("dense",)
    init = stages["init/btx"]
    at = init.argv.index("--btx-sources")  # the base is source 0, then the branches in order
    assert init.argv[init.argv.index("--input") + 1] == dense
    assert init.argv[at + 1:at + 4] == [f"/nonexistent/out/branch/{d}/ckpt"
                                        for d in ("code", "en", "ja")]
    assert init.needs == ("dense", "branch/code", "branch/en", "branch/ja")


@pytest.mark.parametrize("extra, needle", [
    (["--set", "moe.num_experts=6"], "6 is not divisible by its 4 source models"),
    (["--set", "data.demo_corpus=false", "--set", "data.mock=true"],
     "needs data.demo_corpus: true"),
    (["--btx-tokens", str(TOKENS_PER_STEP)],  # one step: shorter than the warm-up
     "stage branch/code: schedule.warmup_steps: 1 must be 0 or less"),
])
def test_bad_btx_request_is_one_line(tmp_path: Path, extra: list[str], needle: str) -> None:
    proc = in_process(compare(tmp_path / "cmp", *extra, methods="btx"))
    assert needle in one_error_line(proc)
    assert not (tmp_path / "cmp").exists()
