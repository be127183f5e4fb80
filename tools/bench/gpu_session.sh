#!/usr/bin/env bash
# One GPU session in one command (H100, ~5 min, at most ~9): the GPU smoke test, the 8x152M
# throughput comparison (ours / transformers / megatron plain, seq 4096, micro-batch 4, with
# a profile) and the 8x1.5B-shaped comparison (6 layers, micro-batch 2).
#
# Run from anywhere in the repo:   OUT=/some/dir bash tools/bench/gpu_session.sh
# Writes under $OUT (default ./bench_out), 7 files in all:
#   session.log, 8x152M/{throughput.json,throughput.md,profile.md,trace_ours.json.gz},
#   8x1.5B-L6/{throughput.json,throughput.md}
# If .whl/ holds wheels (megatron-core for a machine without it), they are installed into
# /tmp/site first. Every step runs even if an earlier one fails; the exit code says whether
# all passed.
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT="${OUT:-./bench_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
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
    say "installing carried wheels: $(ls .whl | tr '\n' ' ')"
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

if [ -d tests/gpu ]; then
    step "gpu smoke test" 150 "$PY" -m pytest -q -rs -s -p no:cacheprovider tests/gpu
fi

BENCH=("$PY" tools/bench/throughput.py --variants ours,hf,plain --seq 4096)

step "8x152M throughput" 200 "${BENCH[@]}" --config configs/8x152M.yaml \
    --micro-batch 4 --steps 10 --warmup 3 --profile --out "$OUT/8x152M"

step "8x1.5B-shaped throughput (6 layers)" 200 "${BENCH[@]}" --config configs/8x1.5B.yaml \
    --layers 6 --micro-batch 2 --steps 8 --warmup 3 --out "$OUT/8x1.5B-L6"

# The tables at the end of the output, where a log tail shows them.
for md in "$OUT/8x152M/throughput.md" "$OUT/8x1.5B-L6/throughput.md"; do
    [ -f "$md" ] && { echo; cat "$md"; } | tee -a "$LOG"
done
say "done, status $status; files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
exit "$status"
