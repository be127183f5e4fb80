"""W&B and TensorBoard never cost the run.

- ``logging.wandb.mode: online`` with credentials but no reachable server (a port that refuses
  connections: in process; a socket that accepts and never answers, the case that hangs: a
  whole run) gives up within
  ``logging.wandb.init_timeout_s``, logs offline under a fresh run id, says so in one warning
  that names the directory to ``wandb sync``, and the run finishes with exit 0.
- wandb's service process killed mid-run, or stopped (it no longer reads: wandb's log call
  would block for good): one warning, training finishes with exit 0 and the exit is bounded
  (``logging.wandb.finish_timeout_s``), no traceback (wandb's own exit hook would print one),
  every record still in metrics.jsonl.
- A W&B or TensorBoard sink that cannot write at all: one warning each, training goes on.

Real wandb client and service, real sockets, real processes; the only "server" is a loopback
socket opened here, so nothing leaves the machine.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatron_ext.config.schema import LoggingConfig
from megatron_ext.training import loggers, wandb_sink
from tests import resilience
from tests.conftest import REPO, free_port
from tests.unit.test_wandb_offline import CREDENTIAL_ENV, _only, history, read_wandb_records

INIT_TIMEOUT_S = 5
# The trainer's online deadline against a dead server: every second of it is waited out. Our
# deadline, not wandb's, always ends the attempt (wandb's own comes 10 s later), so a short one
# cannot race; the start-up it no longer covers is bounded separately (the + 8 s below).
DEAD_SERVER_TIMEOUT_S = 3
FAKE_KEY = "f" * 40  # the length of a real W&B API key
# No checkpoint: W&B is the subject, and a save is seconds of each run's time.
NO_CHECKPOINT = ("--set", "checkpoint.save=null")
SYNC_RE = re.compile(r"`wandb sync (\S+)`")


@pytest.fixture
def blackhole_server():
    """W&B base URL on loopback that accepts connections and never answers (the listening
    socket is never read: the kernel completes the handshake, nothing replies). A server that
    refuses connections fails wandb's own init at once: that fallback is the same code as here
    and is shown in process by test_online_init_failure_falls_back_to_offline; this run, the
    case that would hang, shows the whole process: exit 0, no traceback, offline records."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _env(tmp: Path, **extra: str) -> dict:
    env = resilience.env()
    for name in CREDENTIAL_ENV:
        env.pop(name, None)
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    # WANDB_SILENT: wandb's own chatter stays out, so that the warnings counted are ours.
    env.update(HOME=str(home), WANDB_SILENT="true", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", **extra)
    return env


def _run(args: list[str], env: dict, on_line=None, limit_s: float = 240):
    """Run the trainer; returns (exit code, [(seconds since start, line)]). ``on_line(line,
    proc)`` sees each line as it arrives. Killed (and the test failed) past ``limit_s``."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    watchdog = threading.Timer(limit_s, resilience.kill_job, [proc])
    watchdog.start()
    start, lines = time.monotonic(), []
    try:
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
            if on_line is not None:
                on_line(line, proc)
        code = proc.wait()
    finally:
        watchdog.cancel()
    assert code != -9, f"killed after {limit_s} s:\n" + "\n".join(t for _, t in lines[-30:])
    return code, lines


def _ours(lines) -> list[str]:
    return [text for _, text in lines if text.startswith("WARNING:")]


def _no_traceback(lines) -> None:
    out = "\n".join(text for _, text in lines)
    assert "Traceback" not in out and "Exception ignored" not in out, out[-4000:]


@pytest.mark.slow
def test_online_without_a_server_logs_offline_and_finishes(tmp_path, blackhole_server):
    steps = 6
    args = resilience.small_args(tmp_path, steps, "--set", "logging.wandb.mode=online",
                                 "--set", "logging.wandb.project=test", "--set",
                                 f"logging.wandb.init_timeout_s={DEAD_SERVER_TIMEOUT_S}",
                                 *NO_CHECKPOINT)
    code, lines = _run(args, _env(tmp_path, WANDB_API_KEY=FAKE_KEY,
                                  WANDB_BASE_URL=blackhole_server))
    assert code == 0, "\n".join(t for _, t in lines[-30:])
    _no_traceback(lines)
    warnings = _ours(lines)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("WARNING: W&B online init failed ("), warnings
    # our deadline, not wandb's: it gives up init_timeout + 10 s late
    assert f"did not finish within {DEAD_SERVER_TIMEOUT_S} s" in warnings[0], warnings
    # From the last line before W&B starts to the warning: import wandb, the online attempt,
    # the offline init.
    before = next(t for t, text in lines if text.startswith("backends:"))
    warned = next(t for t, text in lines if text.startswith("WARNING:"))
    assert warned - before < DEAD_SERVER_TIMEOUT_S + 8, (before, warned)

    offline = Path(_only(SYNC_RE.findall(warnings[0])))
    run = tmp_path / "run"
    assert offline.parent == run / "wandb" and offline.name.startswith("offline-run-")
    stable_id = (run / "wandb_run_id").read_text().strip()
    fresh_id = offline.name.rsplit("-", 1)[1]
    assert fresh_id != stable_id  # the half-made online run keeps its id; no collision
    records = read_wandb_records(_only(sorted(offline.glob("run-*.wandb"))))
    assert sorted(history(records)) == list(range(1, steps + 1))
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished cleanly


def _wandb_services(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children(recursive=True)
            if c.name().startswith("wandb-core")]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_wandb_service_fails_mid_run(tmp_path, fault):
    """killed: the service dies (SIGKILL). stopped: it stops answering (SIGSTOP), which makes
    wandb's log call block for good: training must not wait on it, nor the exit."""
    steps, hit = 12, []

    def at_step_3(line: str, proc) -> None:
        if line.startswith("step 3/") and not hit:
            hit.extend(_wandb_services(proc.pid))
            for service in hit:
                service.kill() if fault == "killed" else service.suspend()

    args = resilience.small_args(tmp_path, steps, "--set", "logging.wandb.mode=offline",
                                 "--set", "logging.wandb.project=test",
                                 "--set", "logging.wandb.finish_timeout_s=0.5", *NO_CHECKPOINT)
    try:
        code, lines = _run(args, _env(tmp_path), on_line=at_step_3)
    finally:
        for service in hit:  # it has its own process group: the job's kill misses it
            try:
                service.kill()
            except psutil.Error:
                pass
    assert hit, "no wandb-core process found"
    assert code == 0, "\n".join(t for _, t in lines[-30:])
    _no_traceback(lines)
    warnings = _ours(lines)
    assert len(warnings) == 1, warnings
    if fault == "killed":
        assert warnings[0].startswith("WARNING: W&B failed at step "), warnings
        assert "training continues without W&B" in warnings[0]
    else:  # noticed at the end: finish gave up at finish_timeout_s + 5 s
        assert warnings[0].startswith("WARNING: W&B did not finish within 5.5 s"), warnings
        assert all(not s.is_running() or s.status() == psutil.STATUS_ZOMBIE for s in hit)
    assert any(t.startswith(f"summary: completed | steps {steps} ") for _, t in lines)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))


# ----------------------------------------------------------------------------- in process


def _writer(tmp_path: Path, mode: str, tensorboard: bool = False, **wandb_fields):
    cfg = LoggingConfig(tensorboard=tensorboard)
    cfg.wandb.mode = mode
    for k, v in wandb_fields.items():
        setattr(cfg.wandb, k, v)
    return loggers.MetricsWriter(cfg, tmp_path / "run", {"x": 1}, "r", enabled=True)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for name in CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "run").mkdir()


def test_online_init_failure_falls_back_to_offline(tmp_path, wandb_env, monkeypatch, capsys):
    """The fast twin of the subprocess test: the same code, in this process, 1 s deadline."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # refused
    start = time.monotonic()
    writer = _writer(tmp_path, "online", init_timeout_s=1)
    assert time.monotonic() - start < 20
    for step in (1, 2):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("WARNING:")]
    assert len(warnings) == 1 and "W&B online init failed (" in warnings[0], warnings
    offline = Path(_only(SYNC_RE.findall(warnings[0])))
    assert offline.parent == tmp_path / "run" / "wandb"
    assert not offline.name.endswith((tmp_path / "run" / "wandb_run_id").read_text().strip())
    records = read_wandb_records(_only(sorted(offline.glob("run-*.wandb"))))
    assert sorted(history(records)) == [1, 2]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_wandb_that_cannot_start_is_disabled_with_one_warning(tmp_path, wandb_env, monkeypatch,
                                                              capsys, mode):
    # The run's wandb directory cannot be created (a file is in the way): offline fails too.
    (tmp_path / "run" / "wandb").write_text("not a directory")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    writer = _writer(tmp_path, mode, init_timeout_s=INIT_TIMEOUT_S)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("WARNING:")]
    assert len(warnings) == 1, warnings
    first = "W&B online init failed (" if mode == "online" else "W&B offline init failed ("
    assert warnings[0].startswith("WARNING: " + first), warnings
    assert "NotADirectoryError" in warnings[0] and "W&B disabled" in warnings[0]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_tensorboard_that_cannot_write_warns_once(tmp_path, wandb_env, capsys):
    (tmp_path / "run" / "tensorboard").write_text("not a directory")
    writer = _writer(tmp_path, "disabled", tensorboard=True)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("WARNING:")]
    assert len(warnings) == 1 and "TensorBoard writer failed for" in warnings[0], warnings
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_bounded_call_gives_up_and_hands_a_late_result_on():
    late = []
    release = threading.Event()

    def slow():
        release.wait(10)
        return "connected late"

    start = time.monotonic()
    with pytest.raises(TimeoutError, match="within 0.2 s"):
        wandb_sink._bounded(slow, 0.2, "slow call", on_late=late.append)
    assert time.monotonic() - start < 2
    release.set()
    deadline = time.monotonic() + 5
    while not late and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late == ["connected late"]
    assert wandb_sink._bounded(lambda: 7, 5, "fast call") == 7
    with pytest.raises(ZeroDivisionError):
        wandb_sink._bounded(lambda: 1 / 0, 5, "failing call")
