"""Several CLI runs for the price of one interpreter start-up.

Every tool that touches a model spends ~8 s of CPU importing torch, megatron-core and
transformers before its first line; a test module that runs ten of them pays that ten times.
``run_clis`` starts one driver process that imports those once, then forks one child per call:
each child is still its own process (its own pid, stdout, stderr, exit code, process group of
torch.distributed, ``warn(once=True)`` memory), runs the call exactly as ``python ARGS`` would
(``-m module`` or a script, as ``__main__``), and is waited for before the next one starts.

What a fork cannot give: import-time behaviour (a warning printed while megatron is imported
appears once, in the driver, and is dropped), and start-up settings read by the interpreter
itself (PYTHONIOENCODING...): tests of those keep ``tests.conftest.run_cli``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli

DRIVER = r"""
import json, os, runpy, sys, traceback
from pathlib import Path

calls, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
envs = json.loads(Path(sys.argv[3]).read_text())
import megatron_ext  # noqa: F401  first, as every tool: it hooks megatron-core's import
import torch, megatron.core, transformers  # noqa: E401,F401  the seconds every tool spends first
import megatron.core.models.gpt, megatron.core.dist_checkpointing  # noqa: E401,F401

codes = []
for i, argv in enumerate(calls):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            os.environ.update(envs[i])
            for fd, name in ((1, "out"), (2, "err")):
                f = os.open(out / f"{i}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
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
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
(out / "codes.json").write_text(json.dumps(codes))
"""


def run_clis(calls: list[list[str]], tmp: Path, timeout: int = 900, env: dict | None = None,
             envs: list[dict] | None = None) -> list[subprocess.CompletedProcess]:
    """``run_cli(args)`` for each of ``calls``, in order, one process each, forked from one
    driver that imported the heavy packages once. ``tmp``: an empty directory for the calls'
    outputs. The calls share ``env`` (the driver's, there at import time) and the working
    directory; ``envs[i]`` is added to call i's environment as it starts (variables read at
    run time only)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "calls.json").write_text(json.dumps([[str(a) for a in c] for c in calls]))
    (tmp / "envs.json").write_text(json.dumps(envs or [{} for _ in calls]))
    (tmp / "driver.py").write_text(DRIVER)
    driver = run_cli([str(tmp / "driver.py"), str(tmp / "calls.json"), str(tmp),
                      str(tmp / "envs.json")], timeout=timeout, env=env)
    assert driver.returncode == 0, driver.stderr[-3000:]
    codes = json.loads((tmp / "codes.json").read_text())
    return [subprocess.CompletedProcess([sys.executable, *c], code,
                                        (tmp / f"{i}.out").read_text(errors="replace"),
                                        (tmp / f"{i}.err").read_text(errors="replace"))
            for i, (c, code) in enumerate(zip(calls, codes))]
