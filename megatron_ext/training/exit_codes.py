"""Process exit codes of pretrain_moe.py (the values are megatron_ext.errors', shared by tools).

A preempted run (SIGTERM or SIGUSR1) finishes its step, saves and exits OK: the run is in a
clean, resumable state. scripts/slurm/launcher.sh requeues when it forwarded such a signal;
re-running the same command resumes automatically from ``checkpoint.save``. One that arrives
during start-up, before training, exits OK at once with nothing saved
(megatron_ext.training.signals).
"""

from megatron_ext import errors

OK = errors.EXIT_OK  # finished, or preempted and saved (resumable); --print-config, --dry-run
FAILED = errors.EXIT_FAILED  # unexpected error (traceback printed)
CONFIG = errors.EXIT_USER  # bad config, bad path, unusable checkpoint: one line on stderr
NONFINITE = errors.EXIT_NONFINITE  # more than train.max_skipped_steps non-finite steps; no save
INTERRUPTED = errors.EXIT_INTERRUPTED  # Ctrl-C (SIGINT): 128 + 2; a background write aborted
