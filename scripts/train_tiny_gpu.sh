#!/usr/bin/env bash
# Train the bundled tiny model's recipe on one GPU: two seeds side by side, sized to a time budget, with the
# checkpoints packed for copying back. `lopa train` is the trainer; this script only sizes and runs it.
#
#   scripts/train_tiny_gpu.sh OUTDIR             # on one GPU: about 7-8 minutes (TINY_GPU_MINUTES=6 of training)
#   scripts/train_tiny_gpu.sh --dry-run OUTDIR   # the same steps on CPU with a micro model (CI runs this)
#
# Steps: env (nvidia-smi, torch, CUDA), calibrate (both seeds for CAL steps, on-policy collection included, to
# measure steps per second with both sharing the GPU), train (both seeds with --steps sized to the budget: 85 % of
# it at the calibrated rate, the rest for validation and saves; the LR schedule spans exactly those steps; with
# TINY_GPU_STAGE2 (and TINY_GPU_STAGE3) the steps are split and each seed's next stage starts from its previous
# stage's best or final save), pack (OUTDIR/seed<N>.tar.gz: runs/gpu-s<N> (and runs/gpu2-s<N>, runs/gpu3-s<N>) with the final and best checkpoints, train_log.jsonl
# and state.json, never the optimiser state, plus the seed's logs) and summary (scripts/training_curves.py and the trainer's own test
# score of each seed, and scripts/decoding_order.py on each best save: threshold, confidence order and left to
# right on the 600 test problems). OUTDIR/report.txt holds env, calibration and summary: three files in all.
# Settings (environment): TINY_GPU_MINUTES (training budget, default 6), TINY_GPU_BATCH (default 128),
# TINY_GPU_WORKERS (row-building processes per seed, default 3), TINY_GPU_SEEDS (default "0 1"),
# TINY_GPU_ARGS (more `lopa train` flags, e.g. "--hidden 192 --lr 1e-3"), TINY_GPU_STAGE2 (flags of a second
# stage: when set, each seed then trains again from its own stage-1 best save, `--init-from runs/gpu-s<N>/best`
# (or its final one, TINY_GPU_STAGE2_FROM), into runs/gpu2-s<N>, e.g. v4's stage 2: "--lr 2e-4 --warmup 100
# --on-policy-from 0 --visit-window --lookahead 8"),
# TINY_GPU_STAGE2_SHARE (the second stage's share of the steps and of the budget, default 0.385: v4's 5,000 of
# 13,000), TINY_GPU_STAGE3 (flags of a third stage, from each seed's stage-2 best, `--init-from runs/gpu2-s<N>/best`,
# into runs/gpu3-s<N>; needs TINY_GPU_STAGE2) and TINY_GPU_STAGE3_SHARE (default 0.13: v6's last stage, 2,000 of
# 15,000 steps), TINY_GPU_STAGE2_FROM and TINY_GPU_STAGE3_FROM (which save of the stage before a later stage
# starts from: best, the default, or final, the run's last export after the whole schedule). Exit status: 0 when every seed trained to its last step, 1 otherwise (what was saved is still packed), 2
# on bad usage or no CUDA device.
# After copying back: tar xzf seed0.tar.gz, then `lopa bench --model runs/gpu-s0/best` (CPU) measures it.
set -uo pipefail

DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '5,6p' "$0" | sed 's/^# *//'; exit 0 ;;
        -*) echo "train_tiny_gpu: unknown option $1" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "train_tiny_gpu: one OUTDIR only" >&2; exit 2; }; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || { echo "train_tiny_gpu: OUTDIR is missing" >&2; exit 2; }
S2="${TINY_GPU_STAGE2:-}" S3="${TINY_GPU_STAGE3:-}"
if [ -n "${S3// /}" ] && [ -z "${S2// /}" ]; then
    echo "train_tiny_gpu: TINY_GPU_STAGE3 needs TINY_GPU_STAGE2 (the third stage starts from a save of the second)" >&2
    exit 2
fi
for var in TINY_GPU_STAGE2_FROM TINY_GPU_STAGE3_FROM; do
    case "${!var:-best}" in
        best | final) ;;
        *) echo "train_tiny_gpu: $var is best or final, got '${!var}'" >&2; exit 2 ;;
    esac
done
FROM2="${TINY_GPU_STAGE2_FROM:-best}" FROM3="${TINY_GPU_STAGE3_FROM:-best}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
MINUTES="${TINY_GPU_MINUTES:-6}"
BATCH="${TINY_GPU_BATCH:-128}"
WORKERS="${TINY_GPU_WORKERS:-3}"
SEEDS="${TINY_GPU_SEEDS:-0 1}"
# shellcheck disable=SC2206  # a list of flags
EXTRA=(${TINY_GPU_ARGS:-})
# shellcheck disable=SC2206
STAGE2=(${TINY_GPU_STAGE2:-})
SHARE="${TINY_GPU_STAGE2_SHARE:-0.385}"
# shellcheck disable=SC2206
STAGE3=(${TINY_GPU_STAGE3:-})
SHARE3="${TINY_GPU_STAGE3_SHARE:-0.13}"
RUNS="$ROOT/runs"
CAL=400          # calibration steps (on-policy from step 100: four collections of visited states)
ORDER_N=600      # test problems for scripts/decoding_order.py on each seed's best save
EVAL=(--eval-every 1000 --eval-n 400 --test-n 600 --save-every 1000)
DEVICE=(--device cuda --threads 2)
ORDER_DEVICE=cuda
ARCH=(--layers 5)
if [ "$DRY" = 1 ]; then
    echo "train_tiny_gpu: DRY RUN on CPU with a micro model (no figure here is a GPU figure)"
    MINUTES=0.3 BATCH=8 WORKERS=1 CAL=20 ORDER_N=4
    EVAL=(--eval-every 40 --eval-n 8 --test-n 8 --save-every 40)
    DEVICE=(--device cpu --threads 1)
    ORDER_DEVICE=cpu
    ARCH=(--hidden 32 --layers 1 --heads 2 --kv-heads 1 --intermediate 64)
    RUNS="$OUT/runs"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "train_tiny_gpu: torch sees no CUDA device here; run with --dry-run for the CPU rehearsal" >&2
    exit 2
fi
mkdir -p "$RUNS"
COMMON=(-m lopa train "${DEVICE[@]}" "${ARCH[@]}" --batch "$BATCH" --workers "$WORKERS" "${EXTRA[@]}")

{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    git log -1 --format="commit %H %s" 2>/dev/null || true
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    echo "budget ${MINUTES} min of training, batch $BATCH, workers $WORKERS per seed, seeds $SEEDS, extra: ${EXTRA[*]}"
    [ ${#STAGE2[@]} -gt 0 ] && echo "stage 2 (share $SHARE, from stage 1's $FROM2 save): ${STAGE2[*]}"
    [ ${#STAGE3[@]} -gt 0 ] && echo "stage 3 (share $SHARE3, from stage 2's $FROM3 save): ${STAGE3[*]}"
} 2>&1 | tee "$OUT/report.txt"

# calibrate: every seed for CAL steps at once, the same flags as the real run
for s in $SEEDS; do
    rm -rf "$RUNS/cal-s$s"
    timeout 180 "$PY" "${COMMON[@]}" --seed "$s" --steps 1000000 --until "$CAL" --on-policy-from 100 \
        --eval-every 0 --test-n 0 --save-every "$CAL" --out "$RUNS/cal-s$s" >"$RUNS/calibrate-s$s.log" 2>&1 &
done
wait
[ ${#STAGE2[@]} -gt 0 ] || SHARE=0
[ ${#STAGE3[@]} -gt 0 ] || SHARE3=0
SIZED=$("$PY" - "$RUNS" "$MINUTES" "$CAL" "$SHARE" "$SHARE3" $SEEDS 2>&1 <<'EOF'
import json, sys
from pathlib import Path
runs, minutes, cal = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
share, share3, seeds = float(sys.argv[4]), float(sys.argv[5]), sys.argv[6:]
if not (0 <= share < 1 and 0 <= share3 < 1 and share + share3 < 1):
    sys.exit(f"TINY_GPU_STAGE2_SHARE and TINY_GPU_STAGE3_SHARE must be in [0, 1) with a sum < 1, got {share}, {share3}")
seconds = []
for s in seeds:
    state = runs / f"cal-s{s}" / "train_state" / "state.json"
    if not state.is_file():
        sys.exit(f"calibration of seed {s} wrote no state (see runs/calibrate-s{s}.log)")
    meta = json.loads(state.read_text())
    seconds.append(meta["seconds"] / max(meta["step"], 1))
per_step = max(seconds)  # the slowest seed sets the pace
steps = int(0.85 * minutes * 60 / per_step)  # all stages (their collections cost about the same per step)
second, third = (max(int(steps * x) // 100 * 100, 100) if x else 0 for x in (share, share3))
first = max(steps - second - third - (steps - second - third) % 100, 100)
print(f"calibration: {per_step * 1000:.1f} ms per step with {len(seeds)} seeds side by side -> steps {first} {second} {third} (of {steps})")
EOF
) || {
    echo "train_tiny_gpu: calibration failed: $SIZED" | tee -a "$OUT/report.txt" >&2
    tail -c 2000 "$RUNS"/calibrate-s*.log | tee -a "$OUT/report.txt" >&2
    exit 1
}
echo "$SIZED" | tee -a "$OUT/report.txt"
read -r STEPS STEPS2 STEPS3 _ <<<"${SIZED##*steps }"

# a run that overruns still leaves its best save
LIMIT=$("$PY" -c "print(int($MINUTES * 60 * (1 - $SHARE - $SHARE3) * 1.15 + 30))")
LIMIT2=$("$PY" -c "print(int($MINUTES * 60 * $SHARE * 1.15 + 30))")
LIMIT3=$("$PY" -c "print(int($MINUTES * 60 * $SHARE3 * 1.15 + 30))")
FAILED=0
for s in $SEEDS; do
    rm -rf "$RUNS/gpu-s$s" "$RUNS/gpu2-s$s" "$RUNS/gpu3-s$s" "$RUNS/train2-s$s.log" "$RUNS/train3-s$s.log"
    timeout --kill-after=5 "$LIMIT" "$PY" "${COMMON[@]}" --seed "$s" --steps "$STEPS" "${EVAL[@]}" \
        --out "$RUNS/gpu-s$s" >"$RUNS/train-s$s.log" 2>&1 &
done
for job in $(jobs -p); do wait "$job" || FAILED=1; done
STAGES=(gpu)
# stage N (2 or 3): each seed from its own previous stage's best or final save (SAVE: best or final);
# args: N STEPS LIMIT SAVE FLAGS...
later_stage() {
    local n="$1" steps="$2" limit="$3" save="$4" from="gpu" init
    shift 4
    [ "$n" -gt 2 ] && from="gpu$((n - 1))"
    STAGES+=("gpu$n")
    for s in $SEEDS; do
        init="$RUNS/$from-s$s"
        [ "$save" = best ] && init="$init/best"
        [ -f "$init/model.safetensors" ] || { FAILED=1; continue; }
        timeout --kill-after=5 "$limit" "$PY" "${COMMON[@]}" --seed "$s" --steps "$steps" "${EVAL[@]}" \
            --init-from "$init" "$@" --out "$RUNS/gpu$n-s$s" >"$RUNS/train$n-s$s.log" 2>&1 &
    done
    for job in $(jobs -p); do wait "$job" || FAILED=1; done
}
[ "$STEPS2" -gt 0 ] && later_stage 2 "$STEPS2" "$LIMIT2" "$FROM2" "${STAGE2[@]}"
[ "$STEPS3" -gt 0 ] && later_stage 3 "$STEPS3" "$LIMIT3" "$FROM3" "${STAGE3[@]}"

for s in $SEEDS; do
    [ -d "$RUNS/gpu-s$s" ] || { FAILED=1; continue; }
    packed=()
    for stage in "${STAGES[@]}"; do [ -d "$RUNS/$stage-s$s" ] && packed+=("$stage-s$s"); done
    for n in 2 3; do [ -f "$RUNS/train$n-s$s.log" ] && packed+=("train$n-s$s.log"); done
    tar czf "$OUT/seed$s.tar.gz" -C "$RUNS" --exclude="*/train_state/*.safetensors" "${packed[@]}" \
        "calibrate-s$s.log" "train-s$s.log"
done
TRAINED=() BEST=()  # this call's seeds only: runs/ may hold other seeds from an earlier call
for stage in "${STAGES[@]}"; do
    for s in $SEEDS; do
        [ -f "$RUNS/$stage-s$s/train_log.jsonl" ] && TRAINED+=("$RUNS/$stage-s$s")
        [ -d "$RUNS/$stage-s$s/best" ] && BEST+=("$RUNS/$stage-s$s/best")
    done
done
{
    [ ${#TRAINED[@]} -gt 0 ] && "$PY" scripts/training_curves.py "${TRAINED[@]}" 2>&1
    # each seed's best save on the 600 test problems: threshold, confidence order and left to right (what it knows)
    [ ${#BEST[@]} -gt 0 ] && timeout 120 "$PY" scripts/decoding_order.py "${BEST[@]}" --n "$ORDER_N" \
        --device "$ORDER_DEVICE" 2>&1 | grep -v '^{'
    for s in $SEEDS; do
        for log in "$RUNS/train-s$s.log" "$RUNS/train2-s$s.log" "$RUNS/train3-s$s.log"; do
            [ -f "$log" ] || continue
            echo "seed $s, $(basename "$log" .log):"
            grep -aE "^(test|done|stopped|Traceback|.*Error)" "$log"
        done
    done
    echo "exit $FAILED"
} | tee -a "$OUT/report.txt"
exit "$FAILED"
