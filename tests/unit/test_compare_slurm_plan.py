"""compare_inits.py --slurm's job graph, without SLURM: given which stages' outputs verify and
which jobs are still queued, exactly the unfinished stages (and those whose inputs are redone)
get a job, each waiting (afterok) only for the jobs of its own inputs, the methods' chains side
by side, the report job after all of them; queued jobs are adopted, not submitted twice.
Training jobs go through scripts/slurm/launcher.sh, the one-process tools through srun. Without
sbatch, --slurm is one line and exit 2 with nothing written; --report-only names the first
stage that has not finished.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from megatron_ext.experiments.plan import (
    Experiment,
    ExperimentError,
    build_stages,
    parse_methods,
    same_command,
)
from megatron_ext.experiments.runner import prepare_output
from megatron_ext.experiments.slurm import (
    LAUNCHER,
    ONE_TASK,
    REPORT,
    TRAIN_OPTIONS,
    Job,
    Queue,
    _duration,
    _sbatch_argv,
    finished_ledger,
    job_key,
    live_jobs,
    plan_jobs,
    submit,
)
from tests.compare_runs import TINY, TOKENS_PER_STEP, compare, one_error_line
from tests.conftest import REPO, run_cli

ALL = ["dense", "init/naive", "train/naive", "routing/naive", "init/drop:0.5", "train/drop:0.5",
       "routing/drop:0.5", "train/scratch", "routing/scratch"]


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Experiment:
    return Experiment(REPO / TINY[1], [], parse_methods("naive,drop:0.5,scratch"),
                      1000, tmp_path_factory.mktemp("cmp"), dense_tokens=500)


def graph(exp: Experiment, finished: set[str], live: dict[str, str] | None = None,
          report_exists: bool = False) -> dict[str, tuple]:
    jobs = plan_jobs(build_stages(exp), lambda s: s.name in finished, live or {}, report_exists)
    assert not jobs or jobs[-1].name == REPORT  # the report job comes last
    return {j.name: (j.needs, j.live, j.fresh) for j in jobs}


def test_nothing_finished_chains_every_stage_on_its_inputs(exp) -> None:
    jobs = graph(exp, set())
    assert list(jobs) == [*ALL, REPORT]
    assert jobs["dense"] == ((), None, False)
    # Both initializations wait for the dense base only: the chains run side by side.
    assert jobs["init/naive"][0] == jobs["init/drop:0.5"][0] == ("dense",)
    assert jobs["train/naive"][0] == ("init/naive",)
    assert jobs["routing/drop:0.5"][0] == ("train/drop:0.5",)
    assert jobs["train/scratch"][0] == ()  # scratch needs no dense base
    assert jobs[REPORT][0] == tuple(ALL)
    # A stage whose input is rerun starts afresh (as the local runner does).
    assert all(fresh == bool(needs) for name, (needs, _, fresh) in jobs.items() if name != REPORT)


def test_finished_stages_are_not_submitted_and_their_dependencies_dropped(exp) -> None:
    jobs = graph(exp, {"dense", "init/naive", "init/drop:0.5", "train/drop:0.5"})
    assert list(jobs) == ["train/naive", "routing/naive", "routing/drop:0.5", "train/scratch",
                          "routing/scratch", REPORT]
    assert jobs["train/naive"][0] == () and jobs["routing/drop:0.5"][0] == ()
    assert jobs["routing/naive"][0] == ("train/naive",)
    assert jobs["train/naive"][2] is False  # an interrupted training resumes its checkpoint
    assert jobs[REPORT][0] == tuple(n for n in jobs if n != REPORT)


def test_a_redone_input_redoes_what_was_made_from_it(exp) -> None:
    jobs = graph(exp, set(ALL) - {"dense"})  # e.g. the dense checkpoint was damaged
    assert set(jobs) == set(ALL) - {"train/scratch", "routing/scratch"} | {REPORT}
    # The trainings must not resume from checkpoints of the old base: fresh, workdir removed.
    assert jobs["train/naive"] == (("init/naive",), None, True)


@pytest.mark.parametrize("report_exists", [True, False])
def test_all_finished_submits_at_most_the_report(exp, report_exists: bool) -> None:
    jobs = graph(exp, set(ALL), report_exists=report_exists)
    assert jobs == ({} if report_exists else {REPORT: ((), None, False)})


def test_queued_jobs_are_adopted_not_submitted_again(exp) -> None:
    live = {"dense": "7", "init/naive": "8", REPORT: "20"}
    jobs = graph(exp, set(), live)
    assert jobs["dense"] == ((), "7", False) and jobs["init/naive"] == (("dense",), "8", False)
    assert jobs["init/drop:0.5"][1] is None  # missing from the queue (cancelled): submitted
    assert jobs[REPORT][1] is None  # it would not wait for the new jobs: a new one
    everything = {name: str(i) for i, name in enumerate([*ALL, REPORT])}
    jobs = graph(exp, set(), everything)
    assert all(live == everything[name] for name, (_, live, _) in jobs.items())
    assert graph(exp, set(ALL), {REPORT: "20"}, report_exists=True) == {REPORT: ((), "20", False)}


def test_training_runs_through_the_launcher_and_tools_through_srun(exp) -> None:
    stages = {s.name: s for s in build_stages(exp)}
    user = ["--partition=gpu", "--nodes=2"]
    train = _sbatch_argv(exp, Job("train/naive", stages["train/naive"]), ["5"], user)
    assert "--dependency=afterok:5" in train and "--kill-on-invalid-dep=yes" in train
    assert set(TRAIN_OPTIONS) <= set(train) and train.index("--nodes=2") > train.index(
        TRAIN_OPTIONS[-1])  # the user's options win
    assert any(a.endswith("/logs/train_naive-%j.out") for a in train)
    wrap = shlex.split(train[-1].removeprefix("--wrap="))
    assert f"MOE_CONFIG={exp.config}" in wrap
    launcher = wrap.index(str(LAUNCHER))
    assert wrap[launcher - 2:launcher] == ["exec", "bash"] and "--config" not in wrap[launcher:]
    assert stages["train/naive"].argv[3:] == wrap[launcher + 1:]  # its --set overrides, all
    init = _sbatch_argv(exp, Job("init/naive", stages["init/naive"]), [], user)
    assert not any(a.startswith("--dependency") for a in init)
    assert init[-3:-1] == list(ONE_TASK)  # one task on one node, whatever --sbatch-args said
    wrap = shlex.split(init[-1].removeprefix("--wrap="))
    assert wrap[wrap.index("srun") + 1:] == [sys.executable, "-m", *stages["init/naive"].argv]
    report = shlex.split(_sbatch_argv(exp, Job(REPORT, None), ["1", "2"], [])[-1][7:])
    assert report[-1] == "--report-only" and "--overwrite" not in report


def test_a_stage_recorded_with_an_old_script_path_is_the_same_command() -> None:
    """Older versions ran the stages' tools by repository path (pretrain_moe.py, tools/...):
    such a record is the stage's command, so upgrading does not redo a finished training."""
    new = ["python", "-m", "megatron_ext.cli.pretrain", "--config", "c.yaml"]
    assert same_command(None, new) and same_command(new, new)
    assert same_command(["python", "pretrain_moe.py", "--config", "c.yaml"], new)
    torchrun = ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert same_command([*torchrun, "pretrain_moe.py", "--config", "c.yaml"],
                        [*torchrun, *new[1:]])
    assert not same_command(["python", "pretrain_moe.py", "--config", "d.yaml"], new)
    assert not same_command(["python", "tools/convert/upcycle.py", "--config", "c.yaml"], new)
    assert not same_command(["python", "-m", "megatron_ext.cli.upcycle", "--config", "c.yaml"],
                            new)


@pytest.mark.parametrize("text, seconds", [("00:01:05", 65), ("2-01:00:00", 176400),
                                           ("03:07", 187), ("INVALID", None), ("1-x:00", None)])
def test_slurm_durations(text: str, seconds: float | None) -> None:
    assert _duration(text) == seconds


def test_slurm_without_sbatch_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    # PATH holds the interpreter's directory only: no SLURM commands.
    proc = run_cli(compare(out, "--slurm"), env={"PATH": str(Path(sys.executable).parent)})
    assert "sbatch, squeue, scancel not found on PATH" in one_error_line(proc)
    assert not out.exists()


def test_report_only_names_the_first_unfinished_stage(tmp_path: Path) -> None:
    exp = Experiment(REPO / TINY[1], TINY[3::2], parse_methods("naive,drop:0.5"),
                     4 * TOKENS_PER_STEP, tmp_path / "cmp", dense_tokens=2 * TOKENS_PER_STEP)
    with pytest.raises(ExperimentError, match="holds no run of this experiment"):
        finished_ledger(exp)
    prepare_output(exp.output, exp.fingerprint(), overwrite=False)
    with pytest.raises(ExperimentError, match=r"stage dense has not finished \(nor 6 after it\)"):
        finished_ledger(exp)


class ListedQueue(Queue):
    """squeue's answer given as data (the real one is exercised in tests/slurm)."""

    def __init__(self, rows: dict[str, tuple[str, str]]) -> None:
        self.rows = rows

    def queued(self) -> dict[str, tuple[str, str]]:
        return self.rows


def test_queued_jobs_are_found_by_recorded_id_or_by_name(exp) -> None:
    (exp.output / "stages.json").write_text(json.dumps({"stages": [
        {"name": "dense", "job_id": "12"}, {"name": "init/naive", "job_id": "3"}]}))
    key = job_key(exp)
    queue = ListedQueue({"12": ("renamed-by-hand", "RUNNING"),
                         "13": (f"compare-{key}-train_drop_r0.5", "PENDING"),
                         "14": (f"compare-{key}-report", "PENDING"),
                         "15": ("compare-0000000-train_naive", "PENDING"),  # another DIR's
                         "16_[1-3]": (f"compare-{key}-routing_naive", "PENDING")})  # array job
    assert live_jobs(exp, queue) == {"dense": "12", "train/drop:0.5": "13", REPORT: "14"}


class RefusingQueue(ListedQueue):
    """Accepts ``accept`` jobs, then refuses as sbatch does (the local test cluster accepts any
    well-formed job, so a refusal after some accepted ones cannot be had from it)."""

    def __init__(self, accept: int) -> None:
        super().__init__({})
        self.accept, self.ids, self.cancelled = accept, [], []

    def submit(self, argv: list[str]) -> str:
        if len(self.ids) == self.accept:
            raise ExperimentError("--slurm: sbatch failed (exit 1): refused")
        self.ids.append(str(100 + len(self.ids)))
        return self.ids[-1]

    def cancel(self, ids) -> None:
        self.cancelled += list(ids)


def test_a_refused_job_cancels_the_ones_submitted_before_it(tmp_path: Path) -> None:
    exp = Experiment(REPO / TINY[1], TINY[3::2], parse_methods("naive,drop:0.5"),
                     4 * TOKENS_PER_STEP, tmp_path / "cmp", dense_tokens=2 * TOKENS_PER_STEP)
    prepare_output(exp.output, exp.fingerprint(), overwrite=False)
    queue = RefusingQueue(accept=3)
    with pytest.raises(ExperimentError, match="sbatch failed"):
        submit(exp, queue, {}, [])
    assert queue.cancelled == ["100", "101", "102"]
    assert not (exp.output / "stages.json").exists()
    queue = RefusingQueue(accept=99)  # and accepted: every job recorded
    submit(exp, queue, {}, [])
    ledger = json.loads((exp.output / "stages.json").read_text())
    assert [s["job_id"] for s in ledger["stages"]] == queue.ids[:-1]
    assert ledger["report_job"]["job_id"] == queue.ids[-1] and not queue.cancelled
