#!/usr/bin/env bash
# A/B of libmoepatch under `axolotl train`: runs CONFIG twice with the same seed,
#   A: MOEPATCH=0 LD_PRELOAD=$LIB axolotl train CONFIG     (library loaded, inert)
#   B:            LD_PRELOAD=$LIB axolotl train CONFIG     (MoE blocks fused)
# and prints tokens/s, mean step time, peak GPU memory, the moepatch lines and both loss curves side by
# side; writes NAME.json (summary), NAME.png (loss + step-time plot) and the two console logs to LOGDIR.
#
#   examples/ab.sh CONFIG.yml [STEPS] [-- extra axolotl options, e.g. --micro-batch-size=1]
#
# Environment (all optional):
#   LIB=/abs/libmoepatch.so   default $REPO/build/libmoepatch.so
#   MODEL=/path/model_dir     passed as --base-model (default: the config's base_model)
#   LOGDIR=dir                default /tmp/moepatch_ab/NAME (NAME = config file name without .yml)
#   SIDES="A B"               which runs to make ("B" alone: only the patched run)
#   WARMUP=3                  steps left out of the timing
#   PYTHON=python3            the Python that has torch/transformers (axolotl runs as `$PYTHON -m
#                             axolotl.cli.main`, the entry point of the `axolotl` command)
#   LAUNCHER=accelerate       axolotl's --launcher (accelerate|python); falls back to python when no
#                             `accelerate` command is found
#   RUN_TIMEOUT=seconds       kill a run after this long (counts as a failure)
#   CAST_BACK=1               norms and embeddings back to the model dtype after loading, as axolotl
#                             does for flash-attention configs (see ab_probe.py: with eager/sdpa the
#                             fp32 residual stream breaks the per-expert loop of Ring remote code)
#   MOEPATCH_AB_PROFILE=N     cProfile the host side of step N+1 into LOGDIR/NAME.SIDE.jsonl.prof.txt
#   KEEP_OUTPUT=1             keep axolotl's output_dir (the final model; by default it is deleted
#                             after each run: axolotl always saves the trained model at the end)
# Exit status: non-zero when a run fails (its log tail is printed) or records no step.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage() { sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
CFG=$(cd "$(dirname "$1")" && pwd)/$(basename "$1"); shift
[ -f "$CFG" ] || { echo "ab.sh: no config $CFG" >&2; exit 2; }
STEPS=""
if [ $# -ge 1 ] && [ "$1" != "--" ]; then STEPS=$1; shift; fi
[ $# -ge 1 ] && [ "$1" = "--" ] && shift
EXTRA=("$@")

NAME=$(basename "$CFG" .yml)
LIB=${LIB:-$REPO/build/libmoepatch.so}
LOGDIR=${LOGDIR:-/tmp/moepatch_ab/$NAME}
SIDES=${SIDES:-A B}
WARMUP=${WARMUP:-3}
PYTHON=${PYTHON:-python3}
LAUNCHER=${LAUNCHER:-accelerate}
RUN_OUT=${RUN_OUT:-/tmp/moepatch_ab_out}

case "$LIB" in /*) ;; *) echo "ab.sh: LIB must be an absolute path (got $LIB)" >&2; exit 2;; esac
[ -f "$LIB" ] || { echo "ab.sh: $LIB not found (build it with make)" >&2; exit 2; }
"$PYTHON" -c "import axolotl" 2>/dev/null || { echo "ab.sh: '$PYTHON' cannot import axolotl (PYTHONPATH?)" >&2; exit 2; }
if grep -q '^plugins:' "$CFG"; then echo "ab.sh: $CFG already has plugins:, not supported" >&2; exit 2; fi
# the Python's own bin folder first, so that axolotl finds `accelerate` of the same installation
PATH="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
if [ "$LAUNCHER" = accelerate ] && ! command -v accelerate >/dev/null; then
    echo "ab.sh: no 'accelerate' command on PATH; using --launcher python" >&2
    LAUNCHER=python
fi
mkdir -p "$LOGDIR" "$RUN_OUT"

# the config as given, plus the read-only recording plugin (examples/axolotl/ab_probe.py)
RUN_CFG=$LOGDIR/$NAME.run.yml
{ cat "$CFG"; printf '\nplugins:\n  - ab_probe.ABProbePlugin\n'; } > "$RUN_CFG"

ARGS=()
[ -n "$STEPS" ] && ARGS+=("--max-steps=$STEPS")
[ -n "${MODEL:-}" ] && ARGS+=("--base-model=$MODEL")

declare -A WALL
run_side() {  # $1 = A|B
    local side=$1 log=$LOGDIR/$NAME.$1.log jsonl=$LOGDIR/$NAME.$1.jsonl out=$RUN_OUT/$NAME.$1 moepatch=1 rc t0 t1
    [ "$side" = A ] && moepatch=0
    rm -rf "$out" "$jsonl"
    local cmd=("$PYTHON" -m axolotl.cli.main train "$RUN_CFG" "--launcher=$LAUNCHER" "--output-dir=$out"
               "${ARGS[@]}" "${EXTRA[@]}")
    [ -n "${RUN_TIMEOUT:-}" ] && cmd=(timeout --signal=TERM --kill-after=20 "$RUN_TIMEOUT" "${cmd[@]}")
    echo "[$side] MOEPATCH=$moepatch LD_PRELOAD=$LIB ${cmd[*]}" | tee "$log"
    t0=$(date +%s.%N)
    (cd "$REPO" && env MOEPATCH=$moepatch LD_PRELOAD="$LIB" MOEPATCH_AB_JSONL="$jsonl" MOEPATCH_AB_CAST_BACK="${CAST_BACK:-0}" \
        PYTHONPATH="$REPO/examples/axolotl${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
        HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 \
        WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false "${cmd[@]}") >> "$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    WALL[$side]=$(awk "BEGIN{print $t1 - $t0}")
    [ -n "${KEEP_OUTPUT:-}" ] || rm -rf "$out"
    if [ $rc -ne 0 ] || [ ! -s "$jsonl" ]; then
        echo "ab.sh: run $side of $NAME failed (exit $rc) after ${WALL[$side]}s; last lines of $log:" >&2
        tail -n 40 "$log" | cut -c1-400 >&2
        return 1
    fi
    echo "[$side] done in ${WALL[$side]}s: $log"
}

REPORT=(--name "$NAME" --warmup "$WARMUP" --json "$LOGDIR/$NAME.json" --png "$LOGDIR/$NAME.png")
for side in $SIDES; do
    case $side in A|B) ;; *) echo "ab.sh: SIDES must list A and/or B" >&2; exit 2;; esac
    run_side "$side" || exit 1
    lc=$(echo "$side" | tr AB ab)
    REPORT+=("--$lc" "$LOGDIR/$NAME.$side.jsonl" "--log-$lc" "$LOGDIR/$NAME.$side.log" "--wall-$lc" "${WALL[$side]}")
done
"$PYTHON" "$REPO/examples/axolotl/ab_report.py" "${REPORT[@]}" | tee "$LOGDIR/$NAME.report.txt"
