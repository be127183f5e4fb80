"""Several CLI runs for the price of one interpreter start-up.

Every tool that touches a model spends ~8 s of CPU importing torch, megatron-core and
transformers before its first line; a test module that runs ten of them pays that ten times.
``run_clis`` starts one driver process that imports those once, then forks one child per call:
each child is still its own process (its own pid, stdout, stderr, exit code, process group of
torch.distributed, ``warn(once=True)`` memory), runs the call exactly as ``python ARGS`` would
(``-m module`` or a script, as ``__main__``), and is waited for before the next one starts.

A call may also be a job of several ranks (``nprocs``): the driver forks one child per rank
with the variables torchrun gives its workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, a
``MASTER_PORT`` taken free a moment before the fork, when the imports are already done), so a
two-rank job costs one import, not three (torchrun's own interpreter and one per worker). The
ranks' stdout (and stderr) are joined in rank order; the exit code is the first failing
rank's, and a failing rank takes the others down, as torchrun does. What is not torchrun's:
no ``TORCHELASTIC_*`` variables, no agent to signal; tests of those keep ``conftest.torchrun``.

What a fork cannot give: import-time behaviour (a warning printed while megatron is imported
appears once, in the driver, and is dropped), and start-up settings read by the interpreter
itself (PYTHONIOENCODING...) per call: those are the driver's (``env``), the same for all its
calls; a test that needs them to differ between calls keeps ``tests.conftest.run_cli``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli

DRIVER = r"""
import atexit, json, os, runpy, signal, sys, time, traceback
from pathlib import Path

calls, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
envs = json.loads(Path(sys.argv[3]).read_text())
nprocs = json.loads(Path(sys.argv[4]).read_text())
import megatron_ext  # noqa: F401  first, as every tool: it hooks megatron-core's import
import torch, megatron.core, transformers  # noqa: E401,F401  the seconds every tool spends first
import megatron.core.models.gpt, megatron.core.dist_checkpointing  # noqa: E401,F401
from megatron_ext.platform.launch import free_port


def child(argv, env, name):
    code = 1
    try:
        os.setpgid(0, 0)
        os.environ.update(env)
        for fd, stream in ((1, "out"), (2, "err")):
            f = os.open(out / f"{name}.{stream}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = argv[1:] if argv[0] == "-m" else argv
        if argv[0] == "-m":
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            # What an interpreter's exit runs (os._exit skips it): multiprocessing's finalizers
            # stop megatron's spawned write-results Manager, which would otherwise outlive us.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


codes = []
for i, argv in enumerate(calls):
    sys.stdout.flush()
    sys.stderr.flush()
    n = nprocs[i]
    rendezvous = {} if n == 1 else {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    pids = {}
    for rank in range(n):
        ranked = {} if n == 1 else {"RANK": str(rank), "LOCAL_RANK": str(rank)}
        pid = os.fork()
        if pid == 0:
            child(argv, {**envs[i], **rendezvous, **ranked}, f"{i}.{rank}")
        pids[pid] = rank
    code, deadline = 0, None
    while pids:
        pid, status = os.waitpid(-1, 0 if deadline is None else os.WNOHANG)
        if pid == 0:  # a rank failed: the others get what torchrun's monitor gives them
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            for other in pids:  # then, as torchrun, one failed rank ends the job
                try:
                    os.killpg(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = float("inf")
            continue
        if pids.pop(pid, None) is not None and os.waitstatus_to_exitcode(status) and not code:
            code = os.waitstatus_to_exitcode(status)
            deadline = time.monotonic() + 5
    codes.append(code)
(out / "codes.json").write_text(json.dumps(codes))
"""


def _prepare(calls: list[list[str]], tmp: Path, envs: list[dict] | None,
             nprocs: list[int]) -> list[str]:
    """The driver's arguments, its script and inputs written to ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "calls.json").write_text(json.dumps([[str(a) for a in c] for c in calls]))
    (tmp / "envs.json").write_text(json.dumps(envs or [{} for _ in calls]))
    (tmp / "nprocs.json").write_text(json.dumps(nprocs))
    (tmp / "driver.py").write_text(DRIVER)
    return [str(tmp / "driver.py"), str(tmp / "calls.json"), str(tmp), str(tmp / "envs.json"),
            str(tmp / "nprocs.json")]


def run_clis(calls: list[list[str]], tmp: Path, timeout: int = 900, env: dict | None = None,
             envs: list[dict] | None = None,
             nprocs: list[int] | None = None) -> list[subprocess.CompletedProcess]:
    """``run_cli(args)`` for each of ``calls``, in order, one process each (``nprocs[i]`` ranks
    for call i: what ``torchrun --nproc-per-node`` would start), forked from one driver that
    imported the heavy packages once. ``tmp``: an empty directory for the calls' outputs. The
    calls share ``env`` (the driver's, there at import time) and the working directory;
    ``envs[i]`` is added to call i's environment as it starts (variables read at run time
    only)."""
    nprocs = nprocs or [1] * len(calls)
    driver = run_cli(_prepare(calls, tmp, envs, nprocs), timeout=timeout, env=env)
    assert driver.returncode == 0, driver.stderr[-3000:]
    codes = json.loads((tmp / "codes.json").read_text())

    def joined(i: int, stream: str) -> str:
        return "".join((tmp / f"{i}.{rank}.{stream}").read_text(errors="replace")
                       for rank in range(nprocs[i]))

    return [subprocess.CompletedProcess([sys.executable, *c], code, joined(i, "out"),
                                        joined(i, "err"))
            for i, (c, code) in enumerate(zip(calls, codes))]


COPY_CHECKPOINT = r"""
import shutil, sys
from pathlib import Path
src = Path(sys.argv[1])
for root in map(Path, sys.argv[2:]):
    shutil.copytree(src, root / src.name)
    (root / "latest").write_text(src.name + "\n")
"""


def copy_checkpoint(tmp: Path, src: Path, *roots: Path) -> list[str]:
    """A call that makes each of ``roots`` a checkpoint root holding a copy of ``src`` (an
    ``iter_*`` directory an earlier call of the same driver saves) as its latest: the next
    calls resume from it (its newer siblings left out). Its script is written to ``tmp``."""
    script = tmp / "copy_checkpoint.py"
    script.write_text(COPY_CHECKPOINT)
    return [str(script), str(src), *map(str, roots)]
