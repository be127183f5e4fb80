"""The SLURM backend of the comparison: one sbatch job per unfinished stage, chained with
``--dependency=afterok`` on the jobs of its ``needs``, so the methods' chains run in parallel,
and a last job that writes the report (``compare_inits.py ... --report-only``) after all others.

* A stage is submitted when its output does not verify (``runner.is_done``) or its recorded
  command changed, and also when one of its ``needs`` is submitted (its input will change: a
  training's old checkpoint directory is removed first, as the local runner does). A
  dependency on a finished stage is dropped.
* Training stages run through ``scripts/slurm/launcher.sh`` (torchrun per node, USR1 ->
  checkpoint -> requeue). The one-process tools (upcycle, routing, lm_eval, the report) run as
  ``srun python ...`` in a job of one task on one node: they are not distributed programs, and
  srun makes them a job step that scancel and the time limit signal like any other.
* Every job is named ``compare-<key>-<stage>`` (key: the experiment's fingerprint and DIR) and
  recorded in ``DIR/stages.json`` (job id, dependency, sbatch command, log). A rerun finds the
  jobs still queued or running (squeue, by recorded id or by name) and adopts them instead of
  submitting duplicates. ``--kill-on-invalid-dep=yes``: the dependents of a failed job are
  cancelled, so a rerun resubmits them rather than finding them stuck.
* sbatch missing or failing is one line, exit 2; the jobs this run had submitted are cancelled.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import one_line
from megatron_ext.experiments.plan import (
    FINGERPRINT_FILE,
    PRETRAIN,
    Experiment,
    ExperimentError,
    Stage,
    build_stages,
    same_command,
)
from megatron_ext.experiments.runner import LEDGER, REPO, is_done, stage_env
from megatron_ext.platform.fs import atomic_write

REPORT = "report"
LAUNCHER = REPO / "scripts" / "slurm" / "launcher.sh"
TOOL = "megatron_ext.cli.compare_inits"
# What the model scripts (scripts/slurm/8x152M.sh) give the launcher: one torchrun per node, a
# log continued across requeues, USR1 ahead of the time limit, requeue after it.
TRAIN_OPTIONS = ("--ntasks-per-node=1", "--open-mode=append", "--signal=B:USR1@180", "--requeue")
ONE_TASK = ("--nodes=1", "--ntasks=1")  # after the user's --sbatch-args: a tool needs no more
COMMANDS = ("sbatch", "squeue", "scancel")


@dataclass
class Job:
    """One job to have in the queue: for stage ``name`` (or the report), waiting (afterok) for
    the jobs of ``needs``; ``live`` is the id of one already queued or running for it."""

    name: str
    stage: Stage | None
    needs: tuple[str, ...] = ()
    live: str | None = None
    fresh: bool = False  # a need is rerun: the stage's old workdir goes before it runs


def plan_jobs(stages: list[Stage], finished: Callable[[Stage], bool], live: dict[str, str],
              report_exists: bool) -> list[Job]:
    """The jobs a submission needs, in submission order (see the module docstring); ``live``
    maps stage names (and ``report``) to the ids of their jobs still in the queue."""
    jobs: dict[str, Job] = {}
    for stage in stages:
        needs = tuple(n for n in stage.needs if n in jobs)
        if needs or not finished(stage):
            jobs[stage.name] = Job(stage.name, stage, needs, live.get(stage.name),
                                   fresh=bool(needs) and stage.name not in live)
    if not jobs and report_exists and REPORT not in live:
        return []
    # A queued report job still fits when every stage it waits for is the same queued job.
    adopt = all(j.live for j in jobs.values())
    report = Job(REPORT, None, tuple(jobs), live.get(REPORT) if adopt else None)
    return [*jobs.values(), report]


def job_key(exp: Experiment) -> str:
    """Names this experiment in this DIR: the job names' middle part."""
    text = exp.fingerprint()["fingerprint"] + str(exp.output.resolve())
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def slug(name: str) -> str:
    return name.replace("/", "_").replace(":", "_r")


def read_ledger(output: Path) -> dict:
    try:
        data = json.loads((output / LEDGER).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("stages"), list) else {}
    except (OSError, ValueError):
        return {}


def _recorded_ids(ledger: dict) -> dict[str, str]:
    """job id -> stage name (or report), as DIR/stages.json recorded them."""
    records = [*ledger.get("stages", []), ledger.get("report_job") or {}]
    return {str(r["job_id"]): r.get("name", REPORT) for r in records
            if isinstance(r, dict) and r.get("job_id")}


class Queue:
    """The SLURM commands, found on PATH; run with the stages' environment."""

    def __init__(self) -> None:
        self.paths = {c: shutil.which(c) for c in COMMANDS}
        missing = [c for c, p in self.paths.items() if p is None]
        if missing:
            raise ExperimentError(f"--slurm: {', '.join(missing)} not found on PATH; submit "
                                  "from a SLURM login node, or run without --slurm")

    def _run(self, command: str, *args: str) -> subprocess.CompletedProcess:
        argv = [self.paths[command], *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                  env=stage_env(), cwd=REPO)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ExperimentError(f"{command} failed: {one_line(e)}") from None

    def submit(self, argv: list[str]) -> str:
        proc = self._run("sbatch", "--parsable", *argv)
        job_id = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not job_id.isdigit():
            why = one_line(proc.stderr or proc.stdout or f"exit {proc.returncode}")
            raise ExperimentError(f"--slurm: sbatch failed (exit {proc.returncode}): {why}")
        return job_id

    def queued(self) -> dict[str, tuple[str, str]]:
        """This user's jobs still in the queue: id -> (name, state)."""
        proc = self._run("squeue", "--me", "--noheader", "--format=%i|%j|%T")
        if proc.returncode != 0:
            raise ExperimentError("squeue failed (cannot tell which jobs are still queued): "
                                  + one_line(proc.stderr or f"exit {proc.returncode}"))
        rows = (line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 2)
        return {i.strip(): (n.strip(), s.strip()) for i, n, s in rows}

    def cancel(self, ids: Iterable[str]) -> None:
        if ids := list(ids):
            self._run("scancel", *ids)


def live_jobs(exp: Experiment, queue: Queue) -> dict[str, str]:
    """Stage name (or report) -> id of its job of this DIR still queued or running."""
    key, recorded = job_key(exp), _recorded_ids(read_ledger(exp.output))
    by_name = {f"compare-{key}-{slug(s.name)}": s.name for s in build_stages(exp)}
    by_name[f"compare-{key}-{REPORT}"] = REPORT
    live: dict[str, str] = {}
    queued = [(int(i), n) for i, (n, _state) in queue.queued().items() if i.isdigit()]
    for job_id, name in sorted(queued):
        stage = recorded.get(str(job_id)) or by_name.get(name)
        if stage is not None:
            live[stage] = str(job_id)  # the newest, should a stage have two
    return live


def stored_fingerprint(output: Path) -> str | None:
    try:
        return json.loads((output / FINGERPRINT_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def connect(exp: Experiment, slurm: bool) -> tuple[Queue | None, dict[str, str]]:
    """Before anything is written: the queue (with ``slurm``; ExperimentError when sbatch,
    squeue or scancel is missing) and this experiment's live jobs, which a ``slurm`` rerun
    adopts. Jobs recorded in DIR/stages.json that are still queued or running are refused
    (one line) when DIR is to be run locally, replaced (--overwrite) or is another experiment."""
    queue = Queue() if slurm else None
    same = stored_fingerprint(exp.output) == exp.fingerprint()["fingerprint"]
    if slurm and same:
        return queue, live_jobs(exp, queue)
    recorded = _recorded_ids(read_ledger(exp.output))
    if recorded and queue is None and not all(shutil.which(c) for c in COMMANDS):
        return None, {}  # no SLURM here: none of its jobs can be running
    busy = sorted((i for i in (queue or Queue()).queued() if i in recorded), key=int) \
        if recorded else []
    if busy:
        raise ExperimentError(f"--output {exp.output}: its SLURM jobs {', '.join(busy)} are "
                              "still queued or running; wait for them or scancel them first")
    return queue, {}


def _sbatch_argv(exp: Experiment, job: Job, deps: list[str], user: list[str]) -> list[str]:
    name = slug(job.name)
    log_dir = exp.output.resolve() / "logs"
    argv = [f"--job-name=compare-{job_key(exp)}-{name}", f"--output={log_dir}/{name}-%j.out",
            f"--chdir={REPO}", "--kill-on-invalid-dep=yes"]
    if deps:
        argv.append("--dependency=afterok:" + ":".join(deps))
    python_argv = report_argv(exp) if job.stage is None else job.stage.argv
    bindir = shlex.quote(str(Path(sys.executable).parent))  # the jobs run our interpreter
    if job.stage is not None and python_argv[0] == PRETRAIN:
        i = python_argv.index("--config")
        config, rest = python_argv[i + 1], python_argv[1:i] + python_argv[i + 2:]
        wrap = (f'export PATH={bindir}:"$PATH" MOE_CONFIG={shlex.quote(config)}\n'
                f"exec bash {shlex.quote(str(LAUNCHER))} {shlex.join(rest)}")
        return [*argv, *TRAIN_OPTIONS, *user, f"--wrap={wrap}"]
    srun = shlex.join([sys.executable, "-m", *python_argv])
    wrap = f'export PATH={bindir}:"$PATH"\nexec srun {srun}'
    return [*argv, *user, *ONE_TASK, f"--wrap={wrap}"]


def report_argv(exp: Experiment) -> list[str]:
    """``compare_inits.py`` with ``exp``'s arguments and ``--report-only``."""
    return [TOOL, *exp.cli_args(), "--report-only"]


def submit(exp: Experiment, queue: Queue, live: dict[str, str], user_args: list[str]) -> None:
    """Submit the jobs ``plan_jobs`` asks for, print one line per job, record them in
    DIR/stages.json. Any failure cancels what this call submitted (ExperimentError, one line)."""
    ledger = read_ledger(exp.output)
    old = {r.get("name"): r for r in ledger.get("stages", []) if isinstance(r, dict)}
    old[REPORT] = ledger.get("report_job") or {}

    def finished(stage: Stage) -> bool:
        recorded = old.get(stage.name, {}).get("command")
        return is_done(stage) and same_command(recorded, ["python", "-m", *stage.argv])

    stages = build_stages(exp)
    jobs = plan_jobs(stages, finished, live, (exp.output / "report.md").is_file())
    (exp.output / "logs").mkdir(parents=True, exist_ok=True)
    records, new = {}, []
    try:
        if REPORT in live and not any(j.name == REPORT and j.live for j in jobs):
            queue.cancel([live[REPORT]])  # it waits for jobs being replaced
        for job in jobs:
            deps = [records[n]["job_id"] for n in job.needs]
            records[job.name] = _submit_one(exp, queue, job, deps, user_args,
                                           old.get(job.name, {}))
            new += [] if job.live else [records[job.name]["job_id"]]
    except BaseException:  # sbatch failed, Ctrl-C, SIGTERM: leave no half-chained submission
        queue.cancel(new)
        raise
    for stage in stages:
        if stage.name not in records:
            print(f"compare: {stage.name}: done, skipped", flush=True)
            was = old.get(stage.name, {})  # finished in the job it records, if any
            records[stage.name] = {**was, **_record(stage, was), "state": was.get(
                "state", "") if was.get("job_id") else "skipped (verified)"}
    atomic_write(exp.output / LEDGER, json.dumps(
        {"backend": "slurm", "stages": [records[s.name] for s in stages],
         "report_job": records.get(REPORT) or old[REPORT] or None}, indent=1) + "\n")
    if not jobs:
        print(f"compare: every stage is done; report {exp.output / 'report.md'}", flush=True)


def _record(stage: Stage, old: dict) -> dict:
    return {"name": stage.name, "command": ["python", "-m", *stage.argv], "tokens": stage.tokens,
            "output": str(stage.output), "wall_s": old.get("wall_s"), "runs": old.get("runs", 0)}


def _submit_one(exp: Experiment, queue: Queue, job: Job, deps: list[str],
                user_args: list[str], old: dict) -> dict:
    """Submit ``job`` (or adopt its live job: its old record kept); returns its record."""
    if job.live:
        print(f"compare: {job.name}: job {job.live} still queued or running, not resubmitted",
              flush=True)
        if str(old.get("job_id")) == job.live:
            return {**old, "state": "queued"}
    dependency = "afterok:" + ":".join(deps) if deps else "none"
    argv = _sbatch_argv(exp, job, deps, user_args)
    if not job.live:
        if job.fresh and job.stage.workdir is not None and job.stage.workdir.exists():
            shutil.rmtree(job.stage.workdir)  # made from an input that is being redone
        job_id = queue.submit(argv)
        print(f"compare: {job.name}: job {job_id} (dependency {dependency})", flush=True)
    base = {"name": job.name, "command": ["python", "-m", *report_argv(exp)]} if job.stage is None \
        else _record(job.stage, old)
    job_id = job.live or job_id
    log = exp.output.resolve() / "logs" / f"{slug(job.name)}-{job_id}.out"
    return {**base, "state": "queued" if job.live else "submitted", "job_id": job_id,
            "dependency": dependency, "log": str(log), "sbatch": ["sbatch", *argv]}


def finished_ledger(exp: Experiment) -> list[dict]:
    """For --report-only: every stage's record, once every stage's output verifies (else
    ExperimentError naming the first unfinished one); SLURM jobs' wall times filled in."""
    stored = stored_fingerprint(exp.output)
    if stored != exp.fingerprint()["fingerprint"]:
        raise ExperimentError(f"--output {exp.output} holds no run of this experiment "
                              "(experiment.json missing or different); run it without "
                              "--report-only first")
    stages = build_stages(exp)
    missing = [s.name for s in stages if not is_done(s)]
    if missing:
        more = f" (nor {len(missing) - 1} after it)" if len(missing) > 1 else ""
        raise ExperimentError(f"--report-only: stage {missing[0]} has not finished{more}; see "
                              f"{exp.output / LEDGER} and {exp.output / 'logs'}")
    ledger = read_ledger(exp.output)
    old = {r.get("name"): r for r in ledger.get("stages", []) if isinstance(r, dict)}
    records = []
    for stage in stages:
        rec = {**old.get(stage.name, {}), **_record(stage, old.get(stage.name, {}))}
        if rec.get("job_id") and rec.get("state") != "skipped (verified)":
            rec["wall_s"] = job_wall_s(str(rec["job_id"])) or rec.get("wall_s")
            rec["state"] = f"ran (job {rec['job_id']})"
        rec.setdefault("state", "done")
        records.append(rec)
    if ledger:
        atomic_write(exp.output / LEDGER, json.dumps({**ledger, "stages": records}, indent=1)
                     + "\n")
    return records


def job_wall_s(job_id: str) -> float | None:
    """A finished job's run time (its last run's, after a requeue) from scontrol, else sacct;
    None where neither knows the job any more."""
    for argv, pattern in ((["scontrol", "show", "job", "--oneliner", job_id], r"RunTime=(\S+)"),
                          (["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "Elapsed"], r"(\S+)")):
        if shutil.which(argv[0]) is None:
            continue
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        found = re.search(pattern, proc.stdout) if proc.returncode == 0 else None
        if found and (seconds := _duration(found.group(1))) is not None:
            return seconds
    return None


def _duration(text: str) -> float | None:
    """SLURM's ``[D-]HH:MM:SS`` (or ``MM:SS``) -> seconds."""
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or not 2 <= len(parts) <= 3 or \
            (days and not days.isdigit()):
        return None
    seconds = sum(int(p) * 60 ** i for i, p in enumerate(reversed(parts)))
    return float(seconds + 86400 * int(days or 0))
