"""Process exit codes of pretrain_moe.py.

A preempted run (SIGTERM or SIGUSR1) finishes its step, saves and exits OK: the run is in a
clean, resumable state. scripts/slurm/launcher.sh requeues when it forwarded such a signal;
re-running the same command resumes automatically from ``checkpoint.save``. One that arrives
during start-up, before training, exits OK at once with nothing saved (megatron_ext.training.signals).
"""

OK = 0  # training finished, or preempted and saved (resumable); also --print-config / --dry-run
FAILED = 1  # unexpected error (traceback printed)
CONFIG = 2  # bad config, bad path, unusable checkpoint: one line on stderr
NONFINITE = 4  # more than train.max_skipped_steps non-finite steps; nothing saved over good ckpts
INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + 2, the shell's convention; a background write aborted
