"""What SIGTERM, SIGUSR1 and SIGINT do in every phase of a run.

- Start-up (from the top of pretrain_moe.py, before its imports, to ``start_training``: imports,
  dataset and model build, checkpoint loading):
  SIGTERM/SIGUSR1 raise ``StartupSignal``. It unwinds through every ``finally`` (temporary files
  are removed, process groups shut down) and ``cli.main`` exits 0 with one line: nothing was
  trained, so nothing is lost and a rerun starts the same way. (scripts/slurm/launcher.sh requeues
  on the USR1 it forwarded, whatever the exit code.) A signal that stops the main thread
  inside an import exits at once with the same line instead of raising (``_in_import``).
- Training (``start_training`` onwards): they only set a flag; the loop finishes the step, saves
  and exits 0. A second signal cannot interrupt the save.
- SIGINT (Ctrl-C), any phase: one ``KeyboardInterrupt``; ``cli.main`` prints one line and exits
  130. The loop aborts an in-flight background checkpoint write (never ``latest``). Further
  Ctrl-Cs are ignored so that they cannot break that cleanup with a traceback.

The Python handlers run only when the main thread executes Python, not inside a blocking C call
(a collective waiting for a rank that has left, a TCP store wait). A watchdog thread learns of
each signal from the interpreter's wakeup fd, which the C-level handler writes at once; if the
process is still alive ``STARTUP_GRACE_S`` after a start-up signal (``INTERRUPT_GRACE_S`` after a
Ctrl-C), it prints the line and ends the process with the same exit code.

Several ranks: ``start_training`` is a collective, so a signal that any rank received before it
stops every rank there, together. A rank that leaves earlier makes its peers' next collective
fail (gloo: at once; NCCL: at the process-group timeout); a peer that was signalled too reports
that failure as the signal (``check``), one that was not as a failure (exit 1; torchrun then
ends the job). Signals reach every rank under SLURM (srun) and torchrun (it forwards SIGTERM and
SIGINT); only a signal sent by hand reaches one rank alone.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from megatron_ext.platform import run_lock

# From the launcher's environment: a signal may come before any process group exists.
from megatron_ext.platform.launch import is_rank0
from megatron_ext.training.exit_codes import INTERRUPTED as EXIT_INTERRUPTED
from megatron_ext.training.exit_codes import OK as EXIT_OK

# This module imports nothing heavy (torch only inside ``requested``): pretrain_moe.py installs
# the handlers before its other imports.
STARTUP_GRACE_S = 3.0  # unwinding start-up takes well under a second
INTERRUPT_GRACE_S = 10.0  # after Ctrl-C the cleanup may also finish a W&B run
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPTED_LINE = "interrupted (Ctrl-C)"


class StartupSignal(BaseException):
    """SIGTERM/SIGUSR1 before training began. A BaseException, so that ``except Exception``
    (ours or a library's) does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def line(self) -> str:
        return startup_line(self.signum)


def _in_import(frame) -> bool:
    """Whether the main thread was stopped inside an import. A signal must not raise there: an
    import runs callbacks whose exceptions are swallowed (the import lock's weakref callback) or
    cross C++ (torch's extension modules call Python while they load; an exception there aborts
    the process with SIGABRT). Nothing is being written during an import, so the process exits
    at once instead (atexit callbacks, e.g. the run lock's release, still run)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def startup_line(signum: int) -> str:
    return f"received {signal.Signals(signum).name} during start-up; nothing saved; exiting"


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes the step, saves and exits 0.

    With ``startup=True`` (the CLI) the handlers also cover start-up and Ctrl-C, as described in
    the module docstring. Installs process-wide handlers; call from the main thread.
    """

    def __init__(self, startup: bool = False):
        self.signum = None
        self.interrupted = False
        self.in_startup = startup  # raise on a preemption signal (else: flag only)
        self.started = not startup  # start_training has agreed on every rank
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handler)
        if startup:
            signal.signal(signal.SIGINT, self._interrupt)
            _Watchdog(self).start()
            self._next_unraisable_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable

    def _handler(self, signum, frame):
        first = self.signum is None
        self.signum = signum
        if self.in_startup and first and not self.interrupted:
            if _in_import(frame):
                self.exit(EXIT_OK, startup_line(signum) if is_rank0() else None)
            raise StartupSignal(signum)

    def _unraisable(self, info) -> None:
        """Our handler's exception raised inside a callback whose exceptions Python ignores
        (seen: the import system's module-lock weakref callback; also ``__del__``): print no
        traceback, and deliver the signal again a moment later, once the main thread is out of
        that callback (the watchdog still bounds the exit)."""
        exc = info.exc_value
        if isinstance(exc, StartupSignal):
            self.signum = None  # the handler raises again
            signum = exc.signum
        elif isinstance(exc, KeyboardInterrupt) and self.interrupted:
            self.interrupted = False
            signum = signal.SIGINT
        else:
            self._next_unraisable_hook(info)
            return
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()

    def _interrupt(self, signum, frame):
        if not self.interrupted:  # later Ctrl-Cs: the cleanup of the first one goes on
            if _in_import(frame):
                self.exit(EXIT_INTERRUPTED, INTERRUPTED_LINE if is_rank0() else None, sys.stderr)
            self.interrupted = True
            raise KeyboardInterrupt

    def requested(self, device) -> bool:
        # Imported here, not at the top: this module is imported (and its handlers installed)
        # before torch, whose import takes seconds.
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank must stop at the same step
        return flag.item() > 0

    def start_training(self, device) -> None:
        """End of start-up, on every rank together (a collective). From here a signal only sets
        the flag; one that any rank received before stops every rank here, with nothing saved."""
        self.in_startup = False
        if self.requested(device):
            raise StartupSignal(self.signum or signal.SIGTERM)
        self.started = True

    def check(self) -> None:
        """For an error handler: an error that followed a start-up signal or a Ctrl-C (a peer
        rank that left mid-collective) is reported as that signal, not as a failure."""
        if self.interrupted:
            raise KeyboardInterrupt
        if self.signum is not None and not self.started:
            raise StartupSignal(self.signum)

    def exit(self, code: int, line: str | None, stream=sys.stdout) -> NoReturn:
        """End the process after a start-up signal or a Ctrl-C, once the cleanups (``finally``)
        have run: print ``line``, run the ``atexit`` callbacks (multiprocessing's finalizers,
        logging), flush, and skip the interpreter's teardown. Freeing every module and tensor
        took 4-8 s after the model was built on a loaded 2-core machine; that is CPU work for a
        process about to vanish, not cleanup. Later signals change nothing meanwhile (no
        exception, hence no traceback); the watchdog still bounds the whole exit."""
        self.interrupted = True
        self.in_startup = False
        if line:
            print(line, file=stream, flush=True)
        atexit._run_exitfuncs()  # what Py_Finalize would run first (CPython's own entry point)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def deadline_exit(self, signum: int) -> tuple[float, int, str] | None:
        """(grace in s, exit code, line) if the process must be gone soon after ``signum``."""
        if signum == signal.SIGINT:
            return INTERRUPT_GRACE_S, EXIT_INTERRUPTED, INTERRUPTED_LINE
        if signum in PREEMPT_SIGNALS and not self.started:
            return STARTUP_GRACE_S, EXIT_OK, startup_line(signum)
        return None


_INSTALLED: Preemption | None = None


def install() -> Preemption:
    """The process's start-up ``Preemption`` (signal handlers are process-wide), installed on
    the first call: pretrain_moe.py calls this before its imports, which take seconds, and
    ``cli.main`` again (for other entry scripts)."""
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = Preemption(startup=True)
    return _INSTALLED


def run(entry: Callable[[], int]) -> int:
    """``entry()`` under the start-up handlers (installed first): after a start-up signal or a
    Ctrl-C the process ends here, exit 0 or 130, with one line (from rank 0 only)."""
    preempt = install()
    try:
        return entry()
    except StartupSignal as e:
        preempt.exit(EXIT_OK, e.line() if is_rank0() else None)
    except KeyboardInterrupt:
        preempt.exit(EXIT_INTERRUPTED, INTERRUPTED_LINE if is_rank0() else None, sys.stderr)


class _Watchdog(threading.Thread):
    """Ends the process a grace period after a start-up signal or a Ctrl-C if the main thread
    has not (see the module docstring)."""

    def __init__(self, owner: Preemption):
        super().__init__(name="signal-watchdog", daemon=True)
        self.owner = owner
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # required by set_wakeup_fd
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def run(self) -> None:
        deadline, verdict = None, None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.read_fd], [], [], timeout)
            if ready:
                for signum in os.read(self.read_fd, 64):
                    found = self.owner.deadline_exit(signum)
                    if found is not None and deadline is None:
                        deadline, verdict = time.monotonic() + found[0], found
            elif deadline is not None:
                grace, code, line = verdict
                os.write(sys.stderr.fileno(), f"{line} (forced after {grace:.0f} s)\n".encode())
                run_lock.release_all()  # os._exit skips atexit: the next run must not wait on us
                os._exit(code)  # the main thread is stuck in a C call
