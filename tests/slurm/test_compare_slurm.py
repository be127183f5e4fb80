"""compare_inits.py --slurm on the real local SLURM of conftest.py: a shortened comparison (naive
and drop:0.5 from a given HF dense base, two steps of the tiny model) becomes one job per stage
chained with afterok on the jobs of the stage's inputs, the two methods' chains side by side, and
a last job that writes the report; the command returns at once. A rerun while the jobs are
queued adopts them, a rerun after they finished submits nothing, and a failing sbatch is one
line, exit 2, with no job left behind.

The dense base is given, not trained, to save a training job: a dense stage's job and the
initializations waiting for it are in test_compare_slurm_plan.py
(test_nothing_finished_chains_every_stage_on_its_inputs), the dense stage run locally in
tests/unit/test_compare_inits.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.compare_runs import compare, in_process, one_error_line
from tests.forkrun import run_clis
from tests.slurm.test_sbatch import TERMINAL_STATES

SUBMITTED = re.compile(r"^compare: (\S+): job (\d+) \(dependency (\S+)\)$", re.MULTILINE)
STAGES = ["init/naive", "train/naive", "routing/naive", "init/drop:0.5",
          "train/drop:0.5", "routing/drop:0.5"]


def _compare(dense: Path, out: Path, *extra: str) -> list[str]:
    # Two steps a method: the chain and the jobs' outcome are the subject, not the training (a
    # step more is an evaluation and a checkpoint save more in every training job).
    return compare(out, "--slurm", *extra, steps=2, dense=["--dense", str(dense)])


def _env(cluster) -> dict[str, str]:
    # The launcher finds torchrun on PATH; one training process per job on the 2-core node.
    path = os.pathsep.join([str(Path(sys.executable).parent), cluster.env["PATH"]])
    return {"SLURM_CONF": cluster.env["SLURM_CONF"], "PATH": path, "GPUS_PER_NODE": "1"}


def _all_jobs(cluster) -> set[str]:
    return set(cluster.run("squeue", "--states=all", "--noheader", "--format=%i").stdout.split())


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                     for p in sorted((out / "logs").glob("*.out")))


@pytest.fixture(scope="module")
def submitted(slurm_cluster, hf_dense, tmp_path_factory) -> dict:
    """A submission that sbatch refuses (in a directory of its own), the submission, then right
    away a rerun while the jobs are queued: forked from one driver (tests/forkrun.py), the
    refusal first so that SLURM's view of the dependencies is read right after the rerun."""
    tmp = tmp_path_factory.mktemp("cmp-slurm")
    out, refused = tmp / "cmp", tmp / "refused"
    before = _all_jobs(slurm_cluster)
    # This test cluster accepts any well-formed request (an impossible one waits forever), so
    # the refusal here is the first job's; cancelling earlier ones: test_compare_slurm_plan.py.
    refusal, proc, rerun = run_clis(
        [_compare(hf_dense, refused, "--sbatch-args=--partition=nosuch"),
         _compare(hf_dense, out), _compare(hf_dense, out)],
        tmp / "forkrun", env=_env(slurm_cluster))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {name: (job, dep) for name, job, dep in SUBMITTED.findall(proc.stdout)}
    # Right away, while the chains wait: what SLURM holds as each job's dependency.
    pending = {name: slurm_cluster.job(job).get("Dependency", "") for name, (job, _) in
               jobs.items()}
    return {"out": out, "jobs": jobs, "pending": pending, "stdout": proc.stdout, "rerun": rerun,
            "refused": refused, "refusal": refusal, "before": before,
            "after": _all_jobs(slurm_cluster)}


@pytest.mark.slow
def test_one_job_per_stage_chained_afterok(slurm_cluster, submitted) -> None:
    jobs, out = submitted["jobs"], submitted["out"]
    assert list(jobs) == [*STAGES, "report"], submitted["stdout"]
    ids = {name: job for name, (job, _) in jobs.items()}
    assert jobs["init/naive"][1] == jobs["init/drop:0.5"][1] == "none"  # the base is given
    assert jobs["train/drop:0.5"][1] == f"afterok:{ids['init/drop:0.5']}"
    assert jobs["report"][1] == "afterok:" + ":".join(ids[s] for s in STAGES)
    # SLURM itself holds afterok on exactly those jobs (the report waits for all six).
    held = re.findall(r"afterok:(\d+)", submitted["pending"]["report"])
    assert sorted(held, key=int) == sorted(ids[s] for s in STAGES), submitted["pending"]
    assert f"afterok:{ids['init/naive']}" in submitted["pending"]["train/naive"]
    # squeue shows the names whole: a rerun without stages.json still finds these jobs.
    rows = slurm_cluster.run("squeue", "--me", "--noheader", "--format=%i|%j").stdout.split()
    names = dict(row.split("|") for row in rows)
    assert re.fullmatch(r"compare-[0-9a-f]{8}-report", names[ids["report"]]), names
    assert names[ids["train/drop:0.5"]] == names[ids["report"]][:-6] + "train_drop_r0.5"
    ledger = json.loads((out / "stages.json").read_text())
    assert [(s["name"], s["job_id"]) for s in ledger["stages"]] == [(s, ids[s]) for s in STAGES]
    assert ledger["report_job"]["job_id"] == ids["report"]
    assert all("sbatch" in s["sbatch"][0] and s["command"][0] == "python"
               for s in ledger["stages"])


@pytest.mark.slow
def test_a_rerun_while_queued_submits_no_duplicates(submitted) -> None:
    proc = submitted["rerun"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not SUBMITTED.search(proc.stdout), proc.stdout
    assert "not resubmitted" in proc.stdout
    # The only jobs that the three calls left are the first one's.
    new = {job for job, _ in submitted["jobs"].values()}
    assert submitted["after"] == submitted["before"] | new, (submitted["after"], new)


@pytest.mark.slow
def test_a_refused_sbatch_is_one_line_and_leaves_no_job(submitted) -> None:
    line = one_error_line(submitted["refusal"])
    assert "sbatch failed" in line and "invalid partition" in line.lower(), line
    assert not (submitted["refused"] / "stages.json").exists()
    # No job of it is left: test_a_rerun_while_queued_submits_no_duplicates.


@pytest.mark.slow
def test_the_jobs_run_the_comparison_and_write_the_report(slurm_cluster, hf_dense,
                                                          submitted) -> None:
    out, ids = submitted["out"], {n: j for n, (j, _) in submitted["jobs"].items()}
    info = slurm_cluster.wait_job(ids["report"], lambda i: i["JobState"] in TERMINAL_STATES,
                                  timeout=600, what="the report job")
    assert info["JobState"] == "COMPLETED", _logs(out)
    states = {n: slurm_cluster.job(j) for n, j in ids.items()}
    assert {n: i["JobState"] for n, i in states.items()} == dict.fromkeys(ids, "COMPLETED")
    # The two methods' chains ran side by side (they share only the dense base).
    span = {m: (states[f"init/{m}"]["StartTime"], states[f"train/{m}"]["EndTime"])
            for m in ("naive", "drop:0.5")}
    assert span["naive"][0] < span["drop:0.5"][1] and span["drop:0.5"][0] < span["naive"][1]
    assert "torchrun" not in (out / "logs" / f"init_naive-{ids['init/naive']}.out").read_text()
    assert "[launcher" in (out / "logs" / f"train_naive-{ids['train/naive']}.out").read_text()
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["naive", "drop:0.5"]
    md = (out / "report.md").read_text()
    assert "| naive |" in md and "| drop:0.5 |" in md
    ledger = json.loads((out / "stages.json").read_text())["stages"]
    assert all(s["wall_s"] > 0 and s["state"] == f"ran (job {ids[s['name']]})" for s in ledger)

    # Everything done: a resubmission submits nothing.
    before = _all_jobs(slurm_cluster)
    proc = in_process(_compare(hf_dense, out), env=_env(slurm_cluster))  # nothing to start
    assert proc.returncode == 0 and "every stage is done" in proc.stdout, proc.stderr[-2000:]
    assert not SUBMITTED.search(proc.stdout) and _all_jobs(slurm_cluster) == before
