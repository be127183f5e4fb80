#!/usr/bin/env bash
# A GPU session, all of it within one 10-minute device call on an H100 (or in two parts):
#   part 1: 8x152M (seq 4096, micro-batch 4): ours eager and with train.cuda_graph, transformers,
#           megatron plain; ablations of each of our optimizations; micro-batch 8; profiles
#           (top kernels, device idle share, Chrome traces of ours). Then tests/gpu.
#   part 2: 8x1.5B-shaped layers: 6 layers at micro-batch 2 (ours / graph / hf / plain), then
#           ours at 12 layers and at 18 (the most that fit one H100).
# Per-step timeouts keep the whole under the device's 10-minute limit.
# Run from anywhere in the repo:   OUT=/some/dir bash tools/bench/gpu_session.sh all  (or 1, 2)
# Writes under $OUT (default ./bench_out): session-P.log, results.tgz (each run's
# throughput.json / .md / profile.md under 8x152M/, 8x1.5B-L6/, 8x1.5B-L12/) and the traces
# (8x152M_trace_*.json.gz) beside it: the device tool returns at most 8 files.
# If .whl/ holds wheels (megatron-core for a machine without it), they are installed into
# /tmp/site first. Every step runs even if an earlier one fails; the exit code says whether
# all passed.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
OUT="${OUT:-./bench_out}"
PY="${PYTHON:-python3}"
PART="${1:-all}"
case "$PART" in 1|2|all) ;; *) echo "usage: gpu_session.sh [1|2|all]" >&2; exit 2 ;; esac
mkdir -p "$OUT"
LOG="$OUT/session-$PART.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
# The project is not installed on a bare GPU machine: the checkout provides megatron_ext (the
# scripts find benchlib/ beside themselves).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

say() { echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

step() {  # step NAME TIMEOUT_S CMD...: run, log, remember a failure, carry on
    local name=$1 limit=$2
    shift 2
    say "$name: $*"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "$name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing carried wheels: $(cd .whl && echo *.whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { say "wheel install FAILED"; status=1; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for mod in ("megatron.core", "transformers"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        print(mod, getattr(m, "__version__", "?"), m.__file__)
    except Exception as e:  # noqa: BLE001
        print(mod, "IMPORT FAILED:", e)
EOF
} 2>&1 | tee -a "$LOG"

BENCH=("$PY" tools/bench/throughput.py --seq 4096)
E="+train.cuda_graph=false"  # configs/8x152M.yaml captures the step (train.cuda_graph: true)
G="+train.cuda_graph=true"   # configs/8x1.5B.yaml does not
# 8x152M: ours (graphed, as configured) and eager, hf; plain does not fit at micro-batch 4 (its
# unfused attention keeps [b*heads, s, s] scores per layer), so it runs at 2 beside ours and hf;
# ablations: each of our changes switched back to megatron's own, one at a time (with the graph
# where the change still allows capture, and eager); the largest micro-batch that fits.
MAIN="ours,ours$E,hf,plain+train.micro_batch_size=2,ours+train.micro_batch_size=2"
MAIN="$MAIN,hf+train.micro_batch_size=2"
ABLATE="ours+model.lm_loss=megatron,ours$E+model.lm_loss=megatron"
ABLATE="$ABLATE,ours+model.kernel_fusion=false,ours$E+model.kernel_fusion=false"
ABLATE="$ABLATE,ours$E+moe.token_dispatcher=alltoall,ours$E+moe.grouped_gemm=false"
BIGGER="ours+train.micro_batch_size=8,hf+train.micro_batch_size=8"

if [ "$PART" != 2 ]; then
    step "8x152M throughput" 230 "${BENCH[@]}" --config configs/8x152M.yaml \
        --variants "$MAIN,$ABLATE,$BIGGER" --profile-variants "ours,ours$E,hf" \
        --micro-batch 4 --steps 10 --warmup 3 --profile --out "$OUT/8x152M"
    if [ -d tests/gpu ]; then
        step "gpu tests" 260 "$PY" -m pytest -q -rs -s -p no:cacheprovider tests/gpu
    fi
fi

if [ "$PART" != 1 ]; then
    step "8x1.5B-shaped throughput (6 layers)" 110 "${BENCH[@]}" --config configs/8x1.5B.yaml \
        --variants "ours,ours$G,hf,plain" \
        --layers 6 --micro-batch 2 --steps 8 --warmup 3 --out "$OUT/8x1.5B-L6"
    step "8x1.5B-shaped throughput (12 layers, ours)" 60 "${BENCH[@]}" \
        --config configs/8x1.5B.yaml --variants "ours,ours$G" \
        --layers 12 --micro-batch 2 --steps 6 --warmup 3 --out "$OUT/8x1.5B-L12"
    # The most layers that fit eagerly (70 GiB); the graph's separate memory pool does not fit.
    step "8x1.5B-shaped throughput (18 layers, ours)" 60 "${BENCH[@]}" \
        --config configs/8x1.5B.yaml --variants ours \
        --layers 18 --micro-batch 2 --steps 6 --warmup 3 --out "$OUT/8x1.5B-L18"
fi

# The tables at the end of the output, where a log tail shows them.
for md in "$OUT"/*/throughput.md; do
    [ -f "$md" ] && { echo; cat "$md"; } | tee -a "$LOG"
done
# The device tool returns at most 8 files: the tables and JSON in one archive, traces apart.
mapfile -t dirs < <(cd "$OUT" && find . -mindepth 1 -maxdepth 1 -type d -printf '%P\n')
if [ "${#dirs[@]}" -gt 0 ]; then
    (cd "$OUT" && find "${dirs[@]}" -name 'trace_*' \
        -exec sh -c 'mv "$1" "./$(dirname "$1" | tr / _)_$(basename "$1")"' _ {} \; \
        && tar -czf results.tgz "${dirs[@]}" && rm -rf "${dirs[@]}")
fi
say "done, status $status; files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
exit "$status"
