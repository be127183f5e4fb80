#!/bin/bash
# Shared SLURM launcher for pretrain_moe.py (after the recipe step: moe-recipe, see below).
#
# The per-model scripts next to this file hold the #SBATCH lines, set CONFIG and `exec` this file,
# so it *is* the batch shell and receives the batch-shell signal of `--signal=B:USR1@<secs>`.
# Arguments are passed on to pretrain_moe.py after `--config`, e.g. `--set optimizer.lr=1e-4`.
#
# Layout: one srun task per node runs one torchrun, which starts GPUS_PER_NODE training processes
# and meets the other nodes at a c10d rendezvous hosted on the first node of the allocation.
#
# Time limit / preemption -> requeue:
#   1. SLURM sends USR1 to this shell only (B:), <secs> before the time limit (or at preemption
#      where the cluster sets SlurmctldParameters=preempt_send_user_signal; by hand:
#      `scancel --batch --signal=USR1 <jobid>`).
#   2. We forward it to srun, which relays it to every process of the step. torchrun is started
#      with USR1 ignored: it would otherwise die of it (default action) and orphan its workers,
#      and with its own handling it stops the workers after a fixed grace period. Training
#      processes install their own handler, so they get it: they finish the step, save a
#      checkpoint and exit (0: the run is clean and resumable).
#   3. The exit status cannot say "preempted" (0 also means "finished", and torchrun turns any
#      non-zero worker exit into 1). The USR1 we forwarded does: after it, the job is requeued
#      (`scontrol requeue`), starts again from the top, and pretrain_moe.py resumes from
#      checkpoint.save. Had training just finished, the requeued run resumes at the last step
#      and ends at once. Even a failed shutdown is requeued: the last good checkpoint resumes.
#      Without USR1, status 0 ends the job and anything else fails it.
#   We do not trap TERM: SLURM sends it on scancel and at the hard time limit, and neither may
#   turn into a requeue. (Node failures are requeued by SLURM itself thanks to --requeue.)
#
# Optional environment, read from the submitting shell (sbatch exports it):
#   MOE_CONFIG        config to train instead of the script's CONFIG (smoke tests)
#   GPUS_PER_NODE     training processes per node (default: the job's --gpus-per-node, else 4)
#   CONTAINER_IMAGE   run the step in this image with pyxis (squashfs path or docker://... URI)
#   CONTAINER_MOUNTS  extra pyxis mounts, SRC:DST[,SRC:DST...]; the repository is always mounted
#   MOE_RDZV_HOST, MOE_RDZV_PORT  rendezvous host and port (default: first node, from the job
#                     id); not MASTER_ADDR/PORT, which a shell may still carry from another run
set -uo pipefail

log() { echo "[launcher $(date '+%F %T')] $*"; }
die() { echo "[launcher] error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch (sbatch scripts/slurm/8x152M.sh); do not run directly"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd) || die "cannot locate the repository"
cd "$repo" || die "cannot cd to $repo"

config=${MOE_CONFIG:-${CONFIG:-}}
[ -n "$config" ] || die "CONFIG is not set (the scripts/slurm/<model>.sh file sets it)"
[ -f "$config" ] || die "config $config not found under $repo"

# --gpus-per-node may carry a type ("h100:4"); 0 (CPU runs) falls back to the default.
job_gpus=${SLURM_GPUS_PER_NODE:-}
job_gpus=${job_gpus##*:}
[[ $job_gpus =~ ^[1-9][0-9]*$ ]] || job_gpus=4
nproc=${GPUS_PER_NODE:-$job_gpus}
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$nproc'"

nnodes=${SLURM_JOB_NUM_NODES:-1}
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ "${#nodes[@]}" -gt 0 ] || die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
rdzv_host=${MOE_RDZV_HOST:-${nodes[0]}}
# Derived from the job id so that concurrent jobs sharing a head node do not collide, and kept
# below 32768 where Linux starts handing out ephemeral ports.
rdzv_port=${MOE_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

# Megatron's tensor/sequence-parallel communication overlap relies on kernels reaching the GPU
# in the order they were issued, which only a single hardware work queue guarantees.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Give each training process its share of the node's cores (torchrun would otherwise force 1).
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
threads=$((cpus / nproc))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
# Log lines must reach logs/ as they happen (the tests and users tail them).
export PYTHONUNBUFFERED=1
# NCCL defaults for InfiniBand clusters; anything the user or the site already set wins.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Longer IB retransmission timeout (4.096us * 2^22 ~ 17s): survives transient fabric congestion
# in long all-to-all/all-reduce phases instead of aborting the job.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}

container_args=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
    # The repository is mounted at the same path so that configs, logs and relative
    # checkpoint paths mean the same inside and outside the container.
    container_args=(
        --container-image="$CONTAINER_IMAGE"
        --container-mounts="$repo:$repo${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
        --container-workdir="$repo"
    )
fi
srun_args=(
    --nodes="$nnodes"
    --ntasks-per-node=1
    # A node whose torchrun fails takes the step down; the others would otherwise wait in
    # collectives until the NCCL timeout.
    --kill-on-bad-exit=1
    "${container_args[@]}"
)

torchrun_args=(
    --nnodes="$nnodes"
    --nproc-per-node="$nproc"
    --rdzv-backend=c10d
    --rdzv-endpoint="$rdzv_host:$rdzv_port"
    --rdzv-id="$SLURM_JOB_ID"
)

log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) x $nproc process(es)," \
    "rendezvous $rdzv_host:$rdzv_port, config $config${CONTAINER_IMAGE:+, image $CONTAINER_IMAGE}"

preempted=0
srun_pid=
# After a USR1 (see the top): requeue, so that the job starts again and resumes.
requeue() {
    log "step ended with status $1 after USR1: requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "scontrol requeue failed; submit the same command again to resume"
    exit 1
}
# shellcheck disable=SC2317,SC2329  # only ever called through the trap below
forward_usr1() {
    preempted=1
    log "USR1: time limit or preemption ahead; asking training to checkpoint and stop"
    [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap forward_usr1 USR1

# The paper recipe first (megatron_ext/cli/recipe.py), one process on the first node: it checks
# the run and names every problem at once (exit 2 fails the job before any training starts), and
# when the config names upcycling.dense_base, upcycles it into checkpoint.load, where training
# starts. A rerun or requeue finds that upcycle verified, or a checkpoint to resume, and skips
# it. A USR1 meanwhile is handled once the step returns (bash runs traps between commands).
log "recipe: python -m megatron_ext.cli.recipe --config $config"
# (without MASTER_ADDR/PORT: a shell may carry them from another run, and the step's world of
# one takes a free port of its own)
srun --nodes=1 --ntasks=1 "${container_args[@]}" \
    env -u MASTER_ADDR -u MASTER_PORT python -m megatron_ext.cli.recipe --config "$config" "$@"
status=$?
if [ "$preempted" -eq 1 ]; then requeue "$status"; fi
if [ "$status" -ne 0 ]; then
    log "recipe step failed with status $status; nothing was trained"
    exit "$status"
fi

# `trap '' USR1` before exec: an ignored signal stays ignored across exec, so torchrun survives
# USR1 (step 2 above), while pretrain_moe.py installs its own handler and does receive it.
# shellcheck disable=SC2016  # $@ is expanded by the inner bash, on the compute node
srun "${srun_args[@]}" bash -c 'trap "" USR1; exec "$@"' usr1-ignored \
    torchrun "${torchrun_args[@]}" pretrain_moe.py --config "$config" "$@" &
srun_pid=$!

# A trapped signal makes `wait` return early (status > 128) while srun keeps running, so wait
# again. Once srun's status has been collected, a further wait answers 127: keep the previous.
status=
while :; do
    wait "$srun_pid"
    rc=$?
    if [ "$rc" -eq 127 ] && [ -n "$status" ]; then break; fi
    status=$rc
    [ "$rc" -gt 128 ] || break
done

if [ "$preempted" -eq 1 ]; then requeue "$status"; fi
if [ "$status" -eq 0 ]; then
    log "training finished"
    exit 0
fi
log "step failed with status $status"
exit "$status"
