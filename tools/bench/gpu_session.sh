#!/usr/bin/env bash
# A GPU session in two commands, each within one 10-minute device call (H100):
#   part 1: the GPU smoke test; the LM head + loss alone (megatron's paths vs ours); 8x152M
#           (seq 4096, micro-batch 4): ours / transformers / megatron plain, ablations of each
#           of our optimizations, micro-batch 8 for ours and transformers, and a profile of
#           ours, hf and plain (top kernels, chrome trace).
#   part 2: 8x1.5B-shaped layers: 6 layers at micro-batch 2 (ours / hf / plain, as the
#           reference figures), then ours alone at 12 layers (as many as fit is the question).
#
# Per-step timeouts keep each part under the device's 10-minute limit even with torch.compile's
# first compilations (cold cache) in the smoke test.
# Run from anywhere in the repo:   OUT=/some/dir bash tools/bench/gpu_session.sh 1   (or 2, all)
# Writes under $OUT (default ./bench_out): session-P.log, 8x152M/{lm_loss.json,throughput.json,
# throughput.md,profile.md,trace_ours.json.gz}, 8x1.5B-L6/{json,md}, 8x1.5B-L12/{json,md}.
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
# Ablations: each of our changes switched back to megatron's own, one at a time.
ABLATE="ours+model.lm_loss=megatron,ours+model.kernel_fusion=false"
ABLATE="$ABLATE,ours+moe.token_dispatcher=allgather,ours+moe.token_dispatcher=alltoall"
ABLATE="$ABLATE,ours+moe.grouped_gemm=false"
BIGGER="ours+train.micro_batch_size=8,hf+train.micro_batch_size=8"

if [ "$PART" != 2 ]; then
    if [ -d tests/gpu ]; then
        step "gpu smoke test" 200 "$PY" -m pytest -q -rs -s -p no:cacheprovider tests/gpu
    fi
    step "LM head + loss, 8x152M shape" 90 "$PY" tools/bench/lm_loss.py \
        --tokens 16384 --hidden 512 --vocab 99584 --out "$OUT/8x152M/lm_loss.json"
    step "8x152M throughput" 290 "${BENCH[@]}" --config configs/8x152M.yaml \
        --variants "ours,hf,plain,$ABLATE,$BIGGER" \
        --micro-batch 4 --steps 10 --warmup 3 --profile --out "$OUT/8x152M"
fi

if [ "$PART" != 1 ]; then
    step "8x1.5B-shaped throughput (6 layers)" 300 "${BENCH[@]}" --config configs/8x1.5B.yaml \
        --variants "ours,hf,plain,ours+model.lm_loss=megatron" \
        --layers 6 --micro-batch 2 --steps 8 --warmup 3 --out "$OUT/8x1.5B-L6"
    step "8x1.5B-shaped throughput (12 layers, ours)" 200 "${BENCH[@]}" \
        --config configs/8x1.5B.yaml --variants ours \
        --layers 12 --micro-batch 2 --steps 6 --warmup 3 --out "$OUT/8x1.5B-L12"
fi

# The tables at the end of the output, where a log tail shows them.
for md in "$OUT"/*/throughput.md; do
    [ -f "$md" ] && { echo; cat "$md"; } | tee -a "$LOG"
done
say "done, status $status; files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
exit "$status"
