#!/usr/bin/env bash
# The device check (issue 20): every GPU-facing test and benchmark of the repo in one call, each step under its
# own time limit, so one run on a GPU machine takes all the figures and a broken step cannot hide the others.
#
#   bench/gpu_check.sh OUTDIR             # on one GPU: at most 9 minutes (the step limits add up to 530 s)
#   bench/gpu_check.sh --dry-run OUTDIR   # the same steps on CPU with tiny shapes (CI runs this)
#   bench/gpu_check.sh --only "e2e account" OUTDIR   # a subset of the steps, by name
#
# Steps: env (nvidia-smi, torch / CUDA / transformers versions), gpu_tests (pytest -m gpu over the test files
# that hold gpu tests), step_dream (bench/gpu_step.py with the verbatim yardstick bench/gpu_floor.py), step_llada
# (the same for the LLaDA-8B shape), step_sdar (the SDAR-4B shape), e2e (bench/e2e.py, the engine loop),
# throughput (bench/throughput.py on the bundled model), lopa_bench (a `lopa bench` subset), account (bench/gpu_account.py: bytes, FLOPs and kernels per
# forward; on CUDA also which attention kernel each call gets).
# Each step's output goes to OUTDIR/<step>.log, its JSON lines to OUTDIR/<step>.json; OUTDIR/summary.txt and
# summary.json say which steps passed, failed or timed out. Exit status: 0 if every step passed, 1 otherwise,
# 2 on bad usage. Nothing is installed: without transformers the `hf` columns are skipped (pip install
# 'transformers>=4.45' to get them); without pytest the gpu_tests step fails and says so.
# GPU_CHECK_SCALE=2 doubles every step's limit (a slower card).
set -uo pipefail

usage() { sed -n '4,6p' "$0" | sed 's/^# *//'; }
DRY=0
ONLY=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY="${2:-}"; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "gpu_check: one OUTDIR only" >&2; exit 2; }; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || { echo "gpu_check: OUTDIR is missing" >&2; usage >&2; exit 2; }
STEPS="env gpu_tests step_dream step_llada step_sdar e2e throughput lopa_bench account"
for name in $ONLY; do
    [[ " $STEPS " == *" $name "* ]] || { echo "gpu_check: unknown step '$name' (steps: $STEPS)" >&2; exit 2; }
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
SCALE="${GPU_CHECK_SCALE:-1}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA device here; run with --dry-run for the CPU rehearsal" >&2
    exit 2
fi
HF=""
if ! "$PY" -c "import transformers" 2>/dev/null; then
    HF="--no-hf"
    echo "gpu_check: transformers is not installed: the hf columns are skipped (pip install 'transformers>=4.45')"
fi
GPU_TESTS=$(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort | tr '\n' ' ')

RESULTS=()
FAILED=0
T_START=$SECONDS

# step NAME LIMIT_SECONDS COMMAND...: run it under `timeout`, tee its output to OUTDIR/NAME.log, its JSON lines
# to OUTDIR/NAME.json, and record PASS / FAIL / TIMEOUT; a failing step never stops the next one.
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        return 0
    fi
    limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { t = int(l * s); print (t < 1 ? 1 : t) }')
    local log="$OUT/$name.log" t0=$SECONDS status rc
    echo "=== $name (limit ${limit}s): $*" | tee "$log"
    timeout --kill-after=2 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    grep '^{' "$log" >"$OUT/$name.json" || true
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    [ "$status" = PASS ] || FAILED=1
    RESULTS+=("$(printf '%-12s %-8s %4ds  exit %d' "$name" "$status" $((SECONDS - t0)) "$rc")")
    echo "=== $name: $status in $((SECONDS - t0))s (exit $rc)" | tee -a "$log"
}

env_info() {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    git -C "$ROOT" log -1 --format="commit %H %s" 2>/dev/null || echo "commit: not a git checkout"
    git -C "$ROOT" status --porcelain 2>/dev/null | sed 's/^/local change: /' | head -20
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PY" -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|pytest|safetensors|tokenizers|nvidia-)' || true
    "$PY" - <<'EOF'
import json, platform, importlib.util, torch
cuda = torch.cuda.is_available()
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "installed": {m: importlib.util.find_spec(m) is not None
                      for m in ("transformers", "pytest", "safetensors", "tokenizers", "jinja2", "tqdm")}}
if cuda:
    free, total = torch.cuda.mem_get_info()
    info.update(gpu_memory_gb=round(total / 1e9, 1), gpu_free_gb=round(free / 1e9, 1))
print(json.dumps({"check": "env", **info}))
EOF
}

pytest_gpu() {
    "$PY" -c "import pytest" 2>/dev/null || { echo "pytest is not installed: pip install pytest"; return 1; }
    # shellcheck disable=SC2086  # GPU_TESTS is a list of paths
    # a file that cannot be imported (a missing dev extra) is reported as an error; the other files still run
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --continue-on-collection-errors $GPU_TESTS
}
export -f env_info pytest_gpu
export PY ROOT GPU_TESTS

# check NAME LIMIT GPU-COMMAND... [:: DRY-RUN-EXTRA...]: on a GPU, the command under LIMIT seconds; in the dry run,
# the SAME command with the extra arguments appended (argparse keeps the last value of an option), so the dry run
# parses every flag the GPU run uses, under a generous limit: the rehearsal proves the steps run, not their speed.
check() {
    local name=$1 limit=$2 cmd=() extra=()
    shift 2
    while [ $# -gt 0 ] && [ "$1" != "::" ]; do cmd+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    extra=("$@")
    if [ "$DRY" = 1 ]; then
        step "$name" 120 "${cmd[@]}" "${extra[@]}"
    else
        step "$name" "$limit" "${cmd[@]}"
    fi
}

[ "$DRY" = 1 ] && echo "gpu_check: DRY RUN on CPU with tiny shapes (no figure here is a GPU figure)"
# shellcheck disable=SC2086  # $HF is empty or one flag
{
    check env 20 bash -c env_info
    check gpu_tests 60 bash -c pytest_gpu
    check step_dream 120 "$PY" bench/gpu_step.py --floor-script bench/gpu_floor.py $HF \
        :: --device cpu --shape tiny --branches 1 8 --windows 32 --cache 32 --seqs 1 16 --batch-window 8 \
        --warmup 0 --reps 1
    check step_llada 60 "$PY" bench/gpu_step.py --family llada --no-hf \
        :: --device cpu --shape tiny --branches 1 8 --windows 8 --cache 32 --seqs 1 16 --batch-window 8 \
        --warmup 0 --reps 1
    check step_sdar 60 "$PY" bench/gpu_step.py --family sdar --no-hf \
        :: --device cpu --shape tiny --branches 1 8 --windows 8 --cache 32 --seqs 1 16 --batch-window 8 \
        --warmup 0 --reps 1
    check e2e 100 "$PY" bench/e2e.py \
        :: --device cpu --shape tiny --prompt 16 --block-size 8 --max-new-tokens 16
    check throughput 50 "$PY" bench/throughput.py --device cuda --n 64 --batch 1 16 64 --repeats 1 \
        :: --device cpu --n 4 --batch 1 2 --threads 1
    check lopa_bench 30 "$PY" -m lopa bench --device cuda --n 200 --json-only \
        --decoders threshold lopa-threshold-k4 lopa-threshold-k8 \
        :: --device cpu --n 4 --workers 1 --threads 1
    check account 30 "$PY" bench/gpu_account.py \
        :: --device cpu --profile-shape tiny
}

{
    echo "gpu_check $([ "$DRY" = 1 ] && echo "DRY RUN (CPU)" || echo "on CUDA"): $((SECONDS - T_START))s, $OUT"
    printf '%s\n' "${RESULTS[@]}"
} | tee "$OUT/summary.txt"
"$PY" - "$OUT/summary.txt" "$DRY" >"$OUT/summary.json" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
steps = [dict(step=f[0], status=f[1], seconds=int(f[2][:-1]), exit=int(f[4])) for f in (l.split() for l in lines[1:])]
print(json.dumps({"check": "gpu_check", "dry_run": sys.argv[2] == "1", "steps": steps,
                  "passed": all(s["status"] == "PASS" for s in steps)}))
EOF
exit $FAILED
