"""Process exit codes of pretrain_moe.py (scripts/slurm/launcher.sh requeues on PREEMPTED)."""

OK = 0  # training finished (or --print-config / --dry-run)
FAILED = 1  # unexpected error (traceback printed)
CONFIG = 2  # bad config, bad path, unusable checkpoint: one line on stderr
PREEMPTED = 3  # SIGTERM/SIGUSR1 received, checkpoint saved: requeue and it resumes
NONFINITE = 4  # more than train.max_skipped_steps non-finite steps; nothing saved over good ckpts
