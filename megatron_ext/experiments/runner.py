"""Run a comparison's stages in order, skipping those whose outputs verify.

A stage is finished only when its output verifies: a checkpoint stage when
``checkpoint.store.find_resumable`` finds a checkpoint (sizes and checksums checked) at the
planned step; a JSON stage when its results file parses. An unfinished stage is simply run
again with the same command: ``pretrain_moe.py`` resumes from its own ``checkpoint.save``, the
converter and the routing tool replace their output whole. ``DIR/stages.json`` records each
stage's exact command, wall time, tokens and state, rewritten atomically after every stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_ext.checkpoint.store import ITER_RE, CheckpointError, find_resumable
from megatron_ext.conversion.mcore_io import arch_from_config
from megatron_ext.data.demo import CORPUS_DIR
from megatron_ext.errors import UserError, one_line
from megatron_ext.experiments.plan import (
    FINGERPRINT_FILE,
    Experiment,
    ExperimentError,
    Stage,
    heldout_paths,
    heldout_text,
    same_command,
)
from megatron_ext.platform.fs import atomic_write, check_run_files, open_append
from megatron_ext.upcycling.convert import open_dense

REPO = Path(__file__).resolve().parents[2]
LEDGER = "stages.json"
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class StageFailed(UserError):
    """A stage's command failed: one line naming the stage, its log and the tool's own line; the
    exit code is the tool's (2 for its bad input, 1 for a crash, ...)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code > 0 else 1


def prepare_output(output: Path, fingerprint: dict, overwrite: bool) -> None:
    """Create ``output`` or accept it when it holds this same experiment; a directory holding
    anything else is refused (ExperimentError) unless ``overwrite``, which empties it."""
    stored = output / FINGERPRINT_FILE
    if output.exists() and not output.is_dir():
        raise ExperimentError(f"--output {output} is a file, not a directory")
    # the directories whose files this process appends or adds to: never through a link
    check_run_files(output, ("logs", "heldout"), "--output", error=ExperimentError)
    if output.is_dir() and any(output.iterdir()):
        same = False
        try:
            same = json.loads(stored.read_text()).get("fingerprint") == fingerprint["fingerprint"]
        except (OSError, ValueError, AttributeError):
            pass  # no or unreadable experiment.json: not one of ours, or not this one
        if not same and not overwrite:
            what = "a different experiment" if stored.is_file() else "files of something else"
            raise ExperimentError(f"--output {output} holds {what} (config, methods or tokens "
                                  "differ); choose another directory or pass --overwrite")
        if not same:
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(stored, json.dumps(fingerprint, indent=1) + "\n")


def check_dense(exp: Experiment) -> None:
    """ExperimentError unless the given dense base has the dense shape of ``exp``'s config
    (the MoE config with its experts taken away)."""
    try:
        have = open_dense(exp.dense).arch
    except UserError as e:  # its message names the path already, or gets it here
        message = one_line(e)
        raise ExperimentError(f"--dense: {message}" if str(exp.dense) in message
                              else f"--dense {exp.dense}: {message}") from None
    want = arch_from_config(exp.cfg)
    fields = [f.name for f in dataclasses.fields(have) if f.name not in ("num_experts",
                                                                         "moe_layers")]
    diffs = [f"{f} {getattr(want, f)} vs {getattr(have, f)}" for f in fields
             if getattr(want, f) != getattr(have, f)]
    if have.num_experts:
        diffs.insert(0, f"it has {have.num_experts} experts, not a dense model")
    if diffs:
        raise ExperimentError(f"--dense {exp.dense} does not match --config {exp.config} "
                              f"(config vs dense): {', '.join(diffs)}")


def write_heldout(exp: Experiment) -> None:
    """DIR/heldout/<file>: each demo corpus file's held-out end (plan.heldout_text)."""
    for label, dst in heldout_paths(exp).items():
        src = Path(CORPUS_DIR) / dst.name
        text = heldout_text(src.read_text(encoding="utf-8"), exp.cfg.data.split)
        if not text.strip():
            raise ExperimentError(f"data.split {exp.cfg.data.split!r} holds out nothing of "
                                  f"{src}: no held-out {label} text for the routing analysis")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_file() or dst.read_text(encoding="utf-8") != text:
            atomic_write(dst, text)


def is_done(stage: Stage) -> bool:
    """Whether ``stage``'s output verifies (see the module docstring)."""
    if stage.done == "json":
        try:
            json.loads(stage.output.read_text())
            return True
        except (OSError, ValueError):
            return False
    try:
        found, _ = find_resumable(stage.output)
    except CheckpointError:
        return False
    return found is not None and int(ITER_RE.match(found.name).group(1)) >= stage.steps


def run_logged(argv: list[str], log: Path) -> tuple[int, str]:
    """Run ``python *argv`` (``-m`` and a module, ...) from the repository root, its output to the
    console and ``log``;
    returns the exit code and the last ``error:`` line (or the last line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    last, error = "", ""
    # line-buffered: the log is current while a long stage runs
    with open_append(log) as f, subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=stage_env()) as proc:
        try:
            for line in proc.stdout:
                f.write(line)
                sys.stdout.write("  | " + line)
                last = line.strip() or last
                error = line.strip() if line.startswith("error:") else error
        except BaseException:  # Ctrl-C, SIGTERM (run_cli's Terminated): the stage stops too
            proc.terminate()  # a training saves its step and exits; a rerun resumes it
            _drain(proc, f)
            raise
    return proc.returncode, error or last


def stage_env() -> dict[str, str]:
    """The environment of a stage: ours without the rendezvous variables, which each stage's
    processes choose for themselves (this process may have set them: checking a --dense
    checkpoint opens a process group, and its port is still held)."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _drain(proc: subprocess.Popen, log) -> None:
    """Keep logging a stopping child's last lines (its save) until it exits."""
    for line in proc.stdout:
        log.write(line)
    proc.wait()


def run_stages(stages: list[Stage], output: Path) -> list[dict]:
    """Run every unfinished stage in order; returns the ledger (also in DIR/stages.json)."""
    ledger_file = output / LEDGER
    try:
        previous = {r["name"]: r for r in json.loads(ledger_file.read_text())["stages"]}
    except (OSError, ValueError, KeyError, TypeError):
        previous = {}
    records, redone = [], set()
    for stage in stages:
        record = {"name": stage.name, "command": stage.command, "tokens": stage.tokens,
                  "output": str(stage.output)}
        old = previous.get(stage.name, {})
        stale = any(n in redone for n in stage.needs)  # its inputs changed: start it afresh
        if stale and stage.workdir is not None and stage.workdir.exists():
            shutil.rmtree(stage.workdir)
        # A verified output of another command (an older version of this tool) is redone.
        if not stale and is_done(stage) and same_command(old.get("command"), record["command"]):
            record.update(state="skipped (verified)", wall_s=old.get("wall_s"),
                          runs=old.get("runs", 0))
            print(f"compare: {stage.name}: done, skipped", flush=True)
        else:
            record.update(_execute(stage, output, old))
            redone.add(stage.name)
        records.append(record)
        atomic_write(ledger_file, json.dumps({"stages": records}, indent=1) + "\n")
    return records


def _execute(stage: Stage, output: Path, old: dict) -> dict:
    print(f"compare: {stage.name}: {' '.join(stage.command)}", flush=True)
    log = output / "logs" / (stage.name.replace("/", "_").replace(":", "_r") + ".log")
    start = time.monotonic()
    code, line = run_logged(stage.command[1:], log)
    wall = round(time.monotonic() - start, 2)  # this run's (a resumed training: its last leg)
    if code != 0 or not is_done(stage):
        why = f"exit {code}" if code != 0 else "its output does not verify"
        raise StageFailed(f"stage {stage.name} failed ({why}): {line} (log: {log})",
                          code or 1)
    return {"state": "ran", "wall_s": wall, "runs": old.get("runs", 0) + 1}
