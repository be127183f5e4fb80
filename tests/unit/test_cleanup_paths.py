"""Cleanup and recovery paths never raise (issue 24, class 5): each case with real files and
real processes, asserting the exit code and that the user sees one line (or one warning), never
a traceback.

* A save directory made read-only in the middle of a real training run: the one-line save
  error, exit 2, and nothing from releasing the lock (``platform.run_lock``), neither then nor
  at exit.
* A stale lock whose pid is ``1e400`` or ``-5`` (any malformed field; the field table is in
  ``test_run_lock.py``): one line, exit 2.
* A checkpoint root whose newest checkpoint is damaged: every tool that resolves a root
  (generate, routing, mcore_to_hf, lm_eval, upcycle from mcore, training's checkpoint.load)
  prints the one warning training prints on resume, naming the checkpoint and the file, once
  (``platform.cli.warned``), and goes on with the older one.
* metrics.jsonl lines that are arrays, not UTF-8, have a string step, ... : the one reader
  (``analysis.metrics_log``) skips and counts them with one warning, for loss_curves and the
  comparison's report alike; a file with nothing usable is one error line. (loss_curves' ``main``
  runs in this process for these: what it prints does not depend on being a process of its
  own; its subprocess is shown by the ASCII-terminal case.)
* Text the terminal's encoding cannot show (``PYTHONIOENCODING=ascii``): escaped,
  exit 0 (``platform.cli.safe_console``, in the one CLI runner and in training's entry point).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.forkrun import run_clis
from tests.resilience import popen, small_args, wait_for_line
from tests.unit.test_outputs_vs_inputs import OFFLINE, build_world
from tests.unit.test_run_lock import _make_lock

DAMAGED_FILE = "__0_1.distcp"


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]


# --- a save directory that turns read-only mid-run --------------------------------------------
def _make_read_only(path: Path) -> str:
    """Make ``path`` refuse new entries for this process and its children: chmod for a normal
    user; root ignores modes, so the immutable attribute there. Returns how, or skips."""
    if os.geteuid() != 0:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return "chmod"
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)],
                                                 capture_output=True).returncode == 0:
        return "chattr"
    pytest.skip("no way to make a directory read-only for root here (no chattr +i)")


def _undo_read_only(path: Path, how: str) -> None:
    if how == "chattr":
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(stat.S_IRWXU)


def test_save_dir_made_read_only_mid_run_is_one_line(tmp_path):
    """Saves at steps 20 and 40; between them (the run held with SIGSTOP meanwhile, so that it
    cannot get ahead) the save directory stops taking new entries."""
    proc = popen(small_args(tmp_path, 50, "--set", "checkpoint.save_interval=20"))
    how = None
    try:
        lines = wait_for_line(proc, lambda line: line.startswith("step 21/"))
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            how = _make_read_only(tmp_path / "ckpt")
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        rest = proc.stdout.read()
        code = proc.wait(timeout=300)
    finally:
        if how:
            _undo_read_only(tmp_path / "ckpt", how)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + rest
    _no_traceback(output)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: checkpoint save failed: ") and \
        f"{tmp_path}/ckpt/.tmp_iter_0000040" in errors[0], errors[0]
    assert output.rstrip().splitlines()[-1] == errors[0]  # nothing after it, at exit neither
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000020"


# --- a stale lock with fields no process can have -----------------------------------------------
LOCK_KINDS = ["pid=1e400", "pid=-5", "start_time=NaN", "binary"]


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_malformed_stale_lock_is_one_line(forked, kind):
    run, proc = forked[kind]
    _no_traceback(proc.stderr)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: checkpoint.save {run}/ckpt is in use by another "
                                  f"run (lock {run}/ckpt/.lock is unreadable or malformed")


# --- a damaged newest checkpoint behind a root ----------------------------------------------------
def damage_newest(root: Path) -> Path:
    """A copy of ``root``'s checkpoint as the newer ``iter_0000001`` (named by ``latest``), with
    one byte of one shard flipped: what a crash during a later save or bad storage leaves."""
    new = root / "iter_0000001"
    shutil.copytree(root / "iter_0000000", new)
    meta = json.loads((new / "meta.json").read_text())
    (new / "meta.json").write_text(json.dumps({**meta, "step": 1}, indent=1))
    with open(new / DAMAGED_FILE, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    (root / "latest").write_text("iter_0000001\n")
    return new


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """The class-3 world with its checkpoint root damaged; ``dense`` (its dense model converted)
    is made and damaged by the first calls of ``forked``'s driver."""
    w = build_world(tmp_path_factory.mktemp("fallback"))
    damage_newest(w / "moe")
    return {"world": w, "moe": w / "moe", "dense": w / "dense_mcore"}


# Run by forked's driver right after the dense conversion (tests/ is on its PYTHONPATH).
DAMAGE = """
import sys
from pathlib import Path
from tests.unit.test_cleanup_paths import damage_newest
damage_newest(Path(sys.argv[1]))
"""


def _tool_args(tool: str, r: dict[str, Path], out: Path) -> list[str]:
    w, moe, tok = r["world"], str(r["moe"]), str(r["world"] / "data" / "tok")
    return {
        "generate": ["-m", "megatron_ext.cli.generate", "--checkpoint", moe, "--prompt", "It was",
                     "--tokenizer", tok, "--max-new-tokens", "2"],
        "routing": ["-m", "megatron_ext.cli.routing", "--checkpoint", moe, "--text",
                    f"en={w}/en.txt", "--tokenizer", tok, "--output", str(out)],
        # validation on: it reads the root twice, the warning still comes once
        "mcore_to_hf": ["-m", "megatron_ext.cli.mcore_to_hf", "--input", moe, "--output", str(out)],
        "lm_eval": ["-m", "megatron_ext.cli.lm_eval", "--checkpoint", moe, "--tasks", "demo_en_mc",
                    "--limit", "2", "--tokenizer", tok, "--output", str(out)],
        "upcycle from mcore": ["-m", "megatron_ext.cli.upcycle", "--input", str(r["dense"]),
                               "--output", str(out), "--method", "naive", "--num-experts", "2",
                               "--skip-validation"],
        "training checkpoint.load": [
            "pretrain_moe.py", "--config", f"{moe}/config.yaml", "--set",
            f"checkpoint.load={moe}", "--set", "data.mock=true", "--set",
            "train.train_steps=1", "--set", "schedule.warmup_steps=0", "--set",
            "data.seq_length=32", "--set", f"logging.output_dir={out}"],
    }[tool]


FALLBACK_TOOLS = ["generate", "routing", "mcore_to_hf", "lm_eval", "upcycle from mcore",
                  "training checkpoint.load"]


@pytest.fixture(scope="module")
def forked(roots, tmp_path_factory) -> dict:
    """Each tool once ({tool: run}), a training run per malformed lock ({kind: (run dir, run)})
    and the ASCII-terminal runs ({"ascii " + name: run}), after the dense model's conversion,
    forked from one driver (tests.forkrun): one import of torch and megatron for the
    fifteen; each still its own process, its warn-once memory its own. The driver starts on
    an ASCII terminal (PYTHONIOENCODING is read as an interpreter starts; each call inherits
    it); the tools and lock cases print only ASCII (paths under pytest's tmp), so they show
    the same there as on a UTF-8 one."""
    tmp = tmp_path_factory.mktemp("forked")
    (tmp / "damage.py").write_text(DAMAGE)
    calls = [["-m", "megatron_ext.cli.hf_to_mcore", "--input", str(roots["world"] / "dense"),
              "--output", str(roots["dense"]), "--skip-validation"],
             [str(tmp / "damage.py"), str(roots["dense"])]]
    calls += [_tool_args(tool, roots, tmp / f"out{i}") for i, tool in enumerate(FALLBACK_TOOLS)]
    for i, kind in enumerate(LOCK_KINDS):
        (tmp / f"r{i}" / "ckpt").mkdir(parents=True)
        _make_lock(tmp / f"r{i}" / "ckpt", kind)
        calls.append(small_args(tmp / f"r{i}", 4))
    ascii_calls = _ascii_calls(roots, tmp / "ascii")
    procs = run_clis(calls + list(ascii_calls.values()), tmp / "runs", env={**OFFLINE, **ASCII})
    for proc in procs[:2]:
        assert proc.returncode == 0, proc.stderr[-3000:]
    procs = procs[2:]
    n = len(FALLBACK_TOOLS) + len(LOCK_KINDS)
    return {**dict(zip(FALLBACK_TOOLS, procs)),
            **{kind: (tmp / f"r{i}", procs[len(FALLBACK_TOOLS) + i])
               for i, kind in enumerate(LOCK_KINDS)},
            **{f"ascii {name}": proc for name, proc in zip(ascii_calls, procs[n:])}}


@pytest.mark.parametrize("tool", FALLBACK_TOOLS)
def test_every_tool_warns_once_when_it_falls_back(roots, forked, tool):
    root = roots["dense" if tool == "upcycle from mcore" else "moe"]
    proc = forked[tool]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _no_traceback(proc.stderr)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING:")]
    # word for word what resuming training prints (checkpoint.store.find_resumable)
    assert warnings == [f"WARNING: skipping unusable: {root}/iter_0000001: {DAMAGED_FILE} does "
                        "not match its checksum (damaged); resuming from iter_0000000"], \
        proc.stderr[-3000:]


# --- metrics.jsonl as found, not as written -------------------------------------------------------
def _record(step, loss=None, kind="train"):
    rec = {"kind": kind, "step": step, "tokens": 100 * step} if kind == "train" else \
        {"kind": kind, "step": step}
    return json.dumps({**rec, "loss" if kind == "train" else "val_loss": loss or 6.0 - step})


BAD_LINES = {  # what a damaged, hand-edited or foreign metrics.jsonl holds: (line, first reason)
    "array": (b"[1, 2, 3]", "a JSON list, not an object"),
    "0xff byte": (b'{"kind": "train", "step": 3\xff}', "not UTF-8"),
    "string step": (b'{"kind": "train", "step": "3", "tokens": 300, "loss": 1}',
                    "step is not a non-negative integer"),
    "bool step": (b'{"kind": "train", "step": true, "tokens": 300, "loss": 1}',
                  "step is not a non-negative integer"),
    "no tokens": (b'{"kind": "train", "step": 3, "loss": 1}',
                  "tokens is not a non-negative integer"),
    "half a line (killed)": (b'{"kind": "train", "st', "not JSON"),
    "5000-digit step": (b'{"kind": "train", "step": ' + b"9" * 5000 + b"}", "not JSON"),
    "deep nesting": (b"[" * 100_000, "not JSON"),
    "5 MB line": (b'{"kind": "' + b"x" * (5 << 20) + b'"}', "longer than 4194304 bytes"),
}


def _metrics(run: Path, bad: bytes | None = None, extra: list[str] = ()) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = [_record(1).encode(), _record(2).encode()] + [e.encode() for e in extra]
    if bad is not None:
        lines.append(bad)
    lines += [_record(3).encode(), _record(3, kind="valid").encode(), _record(4).encode()]
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def _loss_curves(capsys, tmp_path: Path) -> subprocess.CompletedProcess:
    """loss_curves on ``tmp_path/run`` in this process (its ``main``: the exit code, stdout and
    stderr a ``python -m`` run shows; the subprocess itself is shown on an ASCII terminal
    below). Its file checks and reads never block, so a hang would be the bug shown."""
    from megatron_ext.cli.loss_curves import main

    capsys.readouterr()
    code = main(["--run", f"a={tmp_path}/run", "--output", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess("loss_curves", code, out, err)


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_loss_curves_skip_bad_lines_with_one_warning(tmp_path, capsys, keep_sigterm, case):
    bad, why = BAD_LINES[case]
    _metrics(tmp_path / "run", bad)
    proc = _loss_curves(capsys, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"WARNING: a: {tmp_path}/run/metrics.jsonl: skipped 1 malformed line of 6; first "
        f"line 3: {why}"]
    assert "| a | 400 | 2.0000 |" in (tmp_path / "out" / "loss_curves.md").read_text()


def test_step_zero_and_non_finite_losses_are_records_not_crashes(tmp_path, capsys,
                                                               keep_sigterm):
    """Step 0 (a record written before the first step) once divided by zero; losses logged as
    "nan" strings (skipped steps) are no points."""
    _metrics(tmp_path / "run", extra=[_record(0), _record(2, loss=3.5), json.dumps(
        {"kind": "train", "step": 2, "tokens": 200, "loss": "nan"})])
    proc = _loss_curves(capsys, tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    from megatron_ext.analysis.curves import read_run

    curve = read_run("a", tmp_path / "run")
    assert curve.train == [(0, 6.0), (100, 5.0), (300, 3.0), (400, 2.0)]  # step 2's last: "nan"
    assert curve.valid == [(300, 3.0)]


def test_nothing_usable_is_one_error_line(tmp_path, capsys, keep_sigterm):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(b"[1]\n\xff\n")
    proc = _loss_curves(capsys, tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: a: {tmp_path}/run/metrics.jsonl has no training records (skipped 2 malformed "
        "lines of 2; first line 1: a JSON list, not an object)"], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_metrics_file_that_never_ends_is_one_error_line(tmp_path, capsys, keep_sigterm,
                                                         special):
    (tmp_path / "run").mkdir()
    if special == "fifo":
        os.mkfifo(tmp_path / "run" / "metrics.jsonl")
    else:
        (tmp_path / "run" / "metrics.jsonl").symlink_to("/dev/zero")
    proc = _loss_curves(capsys, tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: a: {tmp_path}/run/metrics.jsonl is not a regular file"], proc.stderr


def test_the_comparison_report_reads_through_the_same_reader(tmp_path, capsys):
    from megatron_ext.experiments.report import read_metrics

    _metrics(tmp_path / "run", BAD_LINES["array"][0])
    series = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert series["train"] == [(100, 5.0), (200, 4.0), (300, 3.0), (400, 2.0)]
    assert series["val_loss"] == [(300, 3.0)]
    assert capsys.readouterr().err.startswith(f"WARNING: {tmp_path}/run/metrics.jsonl: skipped 1 "
                                              "malformed line of 6; first line 3: a JSON list")


# --- text the terminal cannot show ----------------------------------------------------------------
# An ASCII terminal. (A plain C locale is not one: Python switches to UTF-8 there; with that
# switched off, torch itself cannot read its own UTF-8 source files.)
ASCII = {"PYTHONIOENCODING": "ascii"}


def _ascii_calls(roots: dict[str, Path], tmp: Path) -> dict[str, list[str]]:
    """generate with a Japanese prompt, loss_curves with a Japanese run label, training into a
    Japanese directory (run by ``forked``'s driver, on the ASCII terminal)."""
    tmp.mkdir()
    prompts = tmp / "prompts.txt"
    prompts.write_text("吾輩は猫である\n", encoding="utf-8")
    _metrics(tmp / "run")
    return {
        "generate": ["-m", "megatron_ext.cli.generate",
                     "--checkpoint", str(roots["moe"] / "iter_0000000"), "--prompts", str(prompts),
                     "--tokenizer", str(roots["world"] / "data" / "tok"),
                     "--max-new-tokens", "2"],
        "loss_curves": ["-m", "megatron_ext.cli.loss_curves", "--run", f"猫={tmp}/run",
                        "--output", str(tmp / "out")],
        "training": small_args(tmp / "実験", 3),
    }


def test_generate_prints_a_japanese_prompt_on_an_ascii_terminal(forked):
    proc = forked["ascii generate"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    _no_traceback(proc.stderr)
    # backslash escapes: for --json output they are JSON's own, so records still parse
    assert "\\u543e\\u8f29\\u306f\\u732b" in proc.stdout, proc.stdout


def test_tools_and_training_print_unicode_on_an_ascii_terminal(forked):
    """A Japanese run label in loss_curves' table; a Japanese directory in training's summary."""
    proc = forked["ascii loss_curves"]
    assert proc.returncode == 0 and "| \\u732b | 400 |" in proc.stdout, proc.stderr[-3000:]
    proc = forked["ascii training"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    _no_traceback(proc.stderr)
    assert "\\u5b9f\\u9a13/run/metrics.jsonl" in proc.stdout.splitlines()[-1]
