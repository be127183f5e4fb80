"""Downstream evaluation through lm-evaluation-harness (megatron_ext.cli.lm_eval).

Guarantees shown:
* parity: on one checkpoint (trained by the real pretrain_moe.py at expert-parallel 2 in two
  processes, exported by the real mcore_to_hf.py), our LM class (one process: the checkpoint
  resharded to EP=1) and lm-eval's own HF model on the export give the same per-request
  loglikelihoods (fp32 CPU, within 1e-4), the same greedy flags, the same generated text, the
  same rolling loglikelihoods and the same task metrics, on every local task kind (multiple
  choice en/ja, generation, rolling perplexity en/ja), with batches of 8;
* the CLI writes results.json, results.md and samples/, and appends the metrics to the training
  run's own W&B run (offline); bad input (missing checkpoint, a directory that is no
  checkpoint, unknown task with close matches, an HF directory without a tokenizer, no task, a
  run directory without a W&B run) ends in one line and exit 2;
* the local tasks' shipped data files are exactly what tasks/build_local_tasks.py builds, and
  the tasks load with no network;
* our class is registered in lm-eval's model registry as ``megatron_ext``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.forkrun import run_clis
from tests.resilience import SMALL

TOOL = ["-m", "megatron_ext.cli.lm_eval"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
TASKS = ["demo_en_mc", "demo_ja_mc", "demo_en_gen", "demo_en_ppl", "demo_ja_ppl"]
# The demo corpus and tokenizer instead of SMALL's mock data; a 64-token context so that some
# multiple-choice requests are left-truncated and every perplexity document spans windows.
DEMO = ["--set", "data.mock=false", "--set", "data.demo_corpus=true",
        "--set", "model.vocab_size=4096", "--set", "model.max_position_embeddings=64",
        "--set", "data.valid_sets={}"]


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every process the slow tests look at, forked in order from one driver (tests.forkrun;
    one import of torch, megatron and transformers, not seven): the real pretrain_moe.py at
    expert-parallel 2 in two ranks (logging.wandb offline, its run in ``run/``), its export by
    mcore_to_hf (which carries the run's tokenizer: lm-eval needs no --tokenizer on it), the
    evaluation of each, and the throughput bench on both. The driver is offline from its start
    (huggingface_hub reads those variables as it is imported)."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    ckpt, hf = tmp / "ckpt", tmp / "hf"

    def evaluate(checkpoint: Path, out: Path, *extra: str) -> list[str]:
        return [*TOOL, "--checkpoint", str(checkpoint), "--tasks", ",".join(TASKS), "--limit",
                "12", "--batch-size", "8", "--log-samples", "--output", str(out), *extra]

    calls = {
        "train": ["pretrain_moe.py", *SMALL, *DEMO, "--set", "train.train_steps=20",
                  "--set", "parallel.expert=2", "--set", "logging.wandb.mode=offline",
                  "--set", f"checkpoint.save={ckpt}", "--set", f"logging.output_dir={tmp}/run"],
        "export": ["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(ckpt), "--output",
                   str(hf), "--dtype", "float32"],
        "ours": evaluate(ckpt, tmp / "ours", "--wandb-run-dir", str(tmp / "run")),
        "hf": evaluate(hf, tmp / "hf_eval"),
        "bench": ["tools/bench/eval_throughput.py", "--checkpoint", str(ckpt), "--hf", str(hf),
                  "--tasks", "demo_en_mc,demo_en_gen", "--limit", "2", "--repeats", "1"],
    }
    procs = run_clis(list(calls.values()), tmp / "driver", env=OFFLINE,
                     nprocs=[2, 1, 1, 1, 1])
    for name in ("train", "export"):
        _ok(procs[list(calls).index(name)])
    return {"ckpt": ckpt, "hf": hf, "tmp": tmp, **dict(zip(calls, procs))}


def _results(out: Path):
    results = json.loads((out / "results.json").read_text())
    samples = {t: [json.loads(x) for x in (out / "samples" / f"{t}.jsonl").read_text().splitlines()]
               for t in TASKS}
    return results, samples, (out / "results.md").read_text()


def _responses(rows: list[dict]) -> dict[int, list]:
    return {row["doc_id"]: [r[0] for r in row["resps"]] for row in rows}


@pytest.mark.slow
def test_our_model_matches_lm_eval_hf_model(runs):
    ckpt, tmp = runs["ckpt"], runs["tmp"]
    meta = json.loads(next(ckpt.glob("iter_*/meta.json")).read_text())
    assert meta["layout"]["expert"] == 2  # saved at EP=2, evaluated in one process (EP=1)
    _ok(runs["ours"])
    _ok(runs["hf"])
    ours, our_samples, table = _results(tmp / "ours")
    ref, ref_samples, _ = _results(tmp / "hf_eval")
    assert ref["config"]["model"] != ours["config"]["model"]  # really two different backends
    n_requests = 0
    for task in TASKS:
        a, b = _responses(our_samples[task]), _responses(ref_samples[task])
        assert a.keys() == b.keys() and len(a) == 12, task
        for doc in a:
            for x, y in zip(a[doc], b[doc], strict=True):
                n_requests += 1
                if isinstance(x, str):  # generate_until: the same text, character for character
                    assert x == y, (task, doc)
                elif isinstance(x, list):  # loglikelihood: (logprob, is_greedy)
                    assert abs(x[0] - y[0]) <= 1e-4 and x[1] == y[1], (task, doc, x, y)
                else:  # rolling: a sum over hundreds of tokens, so also a relative bound
                    assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-4), (task, doc, x, y)
    assert n_requests == 12 * (4 + 4 + 1 + 1 + 1)  # every request of every kind compared
    for task in TASKS:
        for metric, value in ours["results"][task].items():
            if isinstance(value, float):
                assert math.isclose(value, ref["results"][task][metric], rel_tol=1e-5), \
                    (task, metric)
    assert "demo_ja_mc" in table and "acc_norm" in table
    _appended_to_training_wandb_run(tmp / "run")


def _appended_to_training_wandb_run(run_dir: Path) -> None:
    """The results went into the training run's own W&B run (same id, a resumed offline run)."""
    rid = (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{rid}/run-{rid}.wandb"))
    assert len(runs) == 2, runs  # training's, then the evaluation's
    assert b"lm_eval/demo_en_mc/acc" in runs[-1].read_bytes()


def _fails(args: list[str], capsys, *needles: str) -> None:
    """In this process (each fault is found before any model exists): the CLI's main gives 2
    and one stderr line. test_bad_input_is_one_line_exit_2_as_a_user_sees_it runs one real
    process for the exit status and stderr exactly as a user sees them."""
    from megatron_ext.cli.lm_eval import main

    capsys.readouterr()
    assert main([*args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def offline(monkeypatch) -> None:
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def test_bad_input_is_one_line_exit_2_as_a_user_sees_it(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_cli([*TOOL, "--checkpoint", str(missing), "--tasks", "demo_en_mc"], env=OFFLINE,
                   timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr == f"error: {missing}: checkpoint not found\n", proc.stderr


def test_bad_input_found_before_loading_is_one_line_exit_2(tmp_path, offline, capsys):
    missing = tmp_path / "nowhere"
    _fails(["--checkpoint", str(missing), "--tasks", "demo_en_mc"], capsys, str(missing),
           "not found")
    _fails(["--checkpoint", str(tmp_path), "--tasks", ","], capsys, "no task")
    _fails(["--checkpoint", str(tmp_path), "--tasks", "demo_en_mc", "--wandb-run-dir",
            str(tmp_path)], capsys, "no W&B run", "wandb_run_id")


@pytest.mark.slow  # imports lm-eval and megatron, and indexes lm-eval's 15k tasks
def test_bad_checkpoint_or_task_is_one_line_exit_2(tmp_path, offline, capsys):
    (tmp_path / "empty").mkdir()
    _fails(["--checkpoint", str(tmp_path / "empty"), "--tasks", "demo_en_mc"], capsys,
           str(tmp_path / "empty"), "no checkpoint found")
    hf = tmp_path / "hf_no_tokenizer"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    _fails(["--checkpoint", str(hf), "--tasks", "demo_en_mc"], capsys, "no tokenizer",
           "--tokenizer")
    _fails(["--checkpoint", str(tmp_path), "--tasks", "demo_en_mc,demo_ja_mcq,hellaswog"],
           capsys, "demo_ja_mcq", "did you mean demo_ja_mc", "hellaswog", "hellaswag")


def test_shipped_task_data_is_what_the_builder_writes():
    proc = run_cli(["tasks/build_local_tasks.py", "--check"])
    assert proc.returncode == 0, proc.stderr
    for task in TASKS:
        assert (REPO / "tasks" / "demo" / f"{task}.yaml").is_file()


def test_local_tasks_load_offline_and_model_is_registered(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    from lm_eval.api.registry import get_model

    from megatron_ext.evaluation import harness
    from megatron_ext.evaluation.lm_eval_model import MegatronLM

    assert get_model("megatron_ext") is MegatronLM
    manager = harness.task_manager(["demo_local"])
    assert harness.check_tasks(manager, ["demo_local"]) == ["demo_local"]
    loaded = manager.load(TASKS)["tasks"]
    sizes = {name: len(list(task.eval_docs)) for name, task in loaded.items()}
    assert sizes == {"demo_en_mc": 100, "demo_ja_mc": 100, "demo_en_gen": 50,
                     "demo_en_ppl": 20, "demo_ja_ppl": 20}


def test_batches_share_prefixes_only_where_it_saves_work():
    from megatron_ext.evaluation.lm_eval_model import plan_batches

    ctx = tuple(range(20))
    pieces = [(ctx, [1] * n) for n in (1, 3, 5, 2)]  # a multiple-choice item: shared
    pieces += [((7,), [2] * 64) for _ in range(12)]  # rolling windows after one EOD: not
    pieces += [((9, 9), [3]), ((9, 9), [4] * 30)]  # a short prefix, long rows: not
    pieces += [(tuple(range(50, 80)), [5] * k) for k in range(1, 21)]  # 20 sharing 30 tokens
    pieces += [((k,) * 12, [6] * 3) for k in range(100, 106) for _ in range(2)]  # 6 pairs
    batches = plan_batches(pieces, batch_size=4, share=True)
    seen = sorted(i for _, groups in batches for _, members in groups for i in members)
    assert seen == list(range(len(pieces)))  # every piece exactly once
    shared = {i for flag, groups in batches if flag for _, members in groups for i in members}
    assert shared == {0, 1, 2, 3, *range(18, 38), *range(38, 50)}
    for flag, groups in batches:
        if flag:  # up to 4 prefixes and 16 continuations
            assert len(groups) <= 4 and sum(len(members) for _, members in groups) <= 16
        else:
            assert all(len(members) == 1 for _, members in groups) and len(groups) <= 4
    # The group of 20 is split (16 + 4); the 6 pairs fill 4 prefixes, then 2.
    sizes = sorted(len(members) for flag, groups in batches if flag for _, members in groups)
    assert sizes == [2] * 6 + [4, 4, 16]
    # A model whose attention takes no padding mask shares nothing.
    assert not any(flag for flag, _ in plan_batches(pieces, 4, share=False))


@pytest.mark.slow
def test_throughput_bench_runs_both_backends(runs):
    proc = runs["bench"]
    _ok(proc)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[2].strip() for line in table[1:]] == ["10", "10"]  # 2x4 + 2
    assert "Largest relative difference of a task metric" in proc.stdout
