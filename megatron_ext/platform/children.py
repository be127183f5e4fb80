"""Helper processes end with the process that started them, even after ``kill -9``.

Who starts helpers: megatron's async checkpointing forks a writer per rank (which forks more
writers) and, for an async save, spawns a result-queue manager (``multiprocessing.Manager``;
``checkpoint.writer_queue`` keeps synchronous saves without one); torchrun starts every
worker in a session of its own (``start_new_session``), so a SIGKILL of torchrun's process group
misses them. None of them notices its parent's death: they would keep running, holding memory,
files and ports (a worker would even go on training). Neither megatron nor torch offers a hook,
but a forked multiprocessing child runs ``multiprocessing.util``'s after-fork callbacks in its
bootstrap (it inherits the one registered here), and a spawned one (which skips them) imports
the main script first: ``megatron_ext.cli.pretrain`` (which ``pretrain_moe.py`` and the
``moe-pretrain`` script import) calls ``bind_helpers`` at import.

Linux's ``PR_SET_PDEATHSIG`` makes the kernel send a signal when the parent dies. It is tied to
the parent *thread*: the helpers here are all started from their parent's main thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) \
    if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ends (Linux; elsewhere a
    no-op returning False). ``parent``: the pid expected as parent; if it has already gone (we
    were re-parented before the request took effect), end now."""
    if _libc is None:
        return False
    parent = os.getppid() if parent is None else parent
    if _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request: nobody will signal us
        os.kill(os.getpid(), sig)
    return True


def _as_helper(_owner: object) -> None:
    """In a new multiprocessing child: live exactly as long as the parent (or until the parent
    ends it). SIGINT/SIGTERM/SIGUSR1 reach the whole process group (Ctrl-C) or every process of a
    SLURM step; the parent decides what becomes of its helpers (waits for a checkpoint write,
    or kills it), so they ignore those signals instead of dying half-way or printing a
    KeyboardInterrupt traceback."""
    parent = multiprocessing.parent_process()
    die_with_parent(signal.SIGKILL, parent.pid if parent is not None else None)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # a forked child must not wake the parent's signal watchdog


class _Registration:
    """The after-fork registry holds weak references: this module keeps the one it needs."""


_REGISTRATION = _Registration()


def bind_helpers() -> None:
    """Make every multiprocessing child started from now on a helper bound to its parent (see
    the module docstring). Idempotent. In a spawned child importing the main script, bind it."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # multiprocessing's own test for "a spawned child is importing the main module".
        _as_helper(None)
    if not getattr(_REGISTRATION, "done", False):
        multiprocessing.util.register_after_fork(_REGISTRATION, _as_helper)
        _REGISTRATION.done = True


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ
