#!/usr/bin/env bash
# The GPU verification batch, in pieces that each fit one lent-GPU call (< 10 min), logs under $OUT
# (default ./device_out). Build here (make), carry build/ and .devlibs/ (and .whl/ for axolotl).
#
#   tests/gpu/device_check.sh devlibs   (here, once) copy the C tests' non-system libraries (Criterion
#                                       and its dependencies) into .devlibs/: the GPU image has no Criterion
#   tests/gpu/device_check.sh kernels   C GPU tests (CUDA vs CPU reference, Hopper engine forms and engine-
#                                       shaped blocks), memcheck and racecheck of the engine cases, bench_gemm.py
#   tests/gpu/device_check.sh python    the GPU pytest modules (fixture families incl. -engine cases,
#                                       real transformers families, aux-free) and bench_moe.py --engine
#   tests/gpu/device_check.sh axolotl   examples/ab.sh: Ring-arch and tiny Qwen3 A/B
#   tests/gpu/device_check.sh axolotl2  examples/ab.sh: Qwen3-30B-A3B-arch A/B, the two LoRA configs
#   tests/gpu/device_check.sh axprof    Ring-arch under axolotl, patched side, host cProfile of one step
#                                       (ab_probe.py MOEPATCH_AB_PROFILE); Qwen3-30B-A3B-arch A/B, 30 steps
#   tests/gpu/device_check.sh axqwen    the two Qwen3 A/Bs (Qwen3-30B-A3B-arch, tiny Qwen3), 30 steps each
#   tests/gpu/device_check.sh axnoise   Ring-arch, MOEPATCH=0 twice (NOISE_STEPS, default 30): how far
#                                       two unpatched runs' losses drift apart (the A/B loss yardstick)
#   tests/gpu/device_check.sh axbig     Ring-arch A/B with 8 x 2048 tokens per step (the Trainer's fixed
#                                       per-step work amortised over 4x the tokens), 20 steps
#   tests/gpu/device_check.sh profile   examples/profile_step.py on the Ring-arch model: default GEMMs, cuBLAS, MOEPATCH=0
#   tests/gpu/device_check.sh ncu       Nsight Compute sections of five engine GEMMs (NCU_SHAPE=...)
#   tests/gpu/device_check.sh ncuhot    the warp-specialized kernel's hottest instructions and stall
#                                       reasons (ncu source page; NCU_SHAPE, NCU_GEMMS, NCU_SCHED)
#   tests/gpu/device_check.sh gemmdiag  bench_gemm.py for this build and the three timing-diagnostic
#                                       builds (make diag: build/diag1..3; carry them), alternating, two
#                                       rounds (DIAG_SHAPES, default ring-mini-2.0)
#   tests/gpu/device_check.sh decode    bench_moe.py at T = 1, 8, 64 (forward replayed from a CUDA graph
#                                       against the weight-read time: issue 4's decode bound)
#   tests/gpu/device_check.sh decodeab  decode C tests, then bench_moe.py's decode table and profile_decode.py
#                                       for this build and PREV's (as for ab), alternating in one call
#   tests/gpu/device_check.sh ab        this build against another commit's, alternating in one call:
#                                       bench_gemm.py and the T=16384 layers of bench_moe.py. PREV (default
#                                       build/prev) holds that build's .so files, made here with
#                                       git worktree add /tmp/prev COMMIT && make -C /tmp/prev &&
#                                       mkdir -p build/prev && cp /tmp/prev/build/*.so build/prev/
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=$PWD/.devlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
LIB=$PWD/build/libmoepatch.so

# axolotl's wheels (.whl/, carried) into /tmp/site; the paths both axolotl pieces use
axolotl_env() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
    M=/tmp/moe_models E=examples/axolotl C=$OUT/console.log
}
# the summary lines of an ab.sh run, for the call's output (the whole run is in $C)
ab_summary() { grep -E "tokens/s|median step|peak alloc|speed-up|patched|loss rel"; }

case "${1:-}" in
devlibs)
    mkdir -p .devlibs
    for l in $(ldd build/tests/test_cuda_kernels | awk '/=>/ {print $3}'); do
        case $(basename "$l") in
        libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | libresolv.so* | ld-linux* | libcud* | \
            libcublas* | libmoepatch* | libstdc++* | libgcc_s*) ;;
        *) cp -L "$l" .devlibs/ ;;
        esac
    done
    ls .devlibs
    ;;
kernels)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    timeout 300 ./build/tests/test_cuda_kernels --jobs 8 --verbose >"$OUT/ctest.log" 2>&1
    echo "test_cuda_kernels rc=$?"
    grep -E "FAIL|Synthesis" "$OUT/ctest.log"
    MOE_TEST_SMALL=1 timeout 150 compute-sanitizer --tool memcheck ./build/tests/test_cuda_kernels \
        --filter='cuda_kernels/@(grouped*|decode*|permutation*)' --jobs 1 >"$OUT/memcheck.log" 2>&1
    tail -3 "$OUT/memcheck.log"
    timeout 200 python3 tests/bench/bench_gemm.py --out "$OUT/gemm.json" 2>&1 | tee "$OUT/bench_gemm.log" | tail -40
    MOE_TEST_SMALL=1 timeout ${RACE_TIMEOUT:-150} compute-sanitizer --tool racecheck --racecheck-report hazard \
        ./build/tests/test_cuda_kernels --filter='cuda_kernels/@(grouped*|decode*|permutation*)' --jobs 1 \
        >"$OUT/racecheck.log" 2>&1
    echo "racecheck rc=$?"
    tail -3 "$OUT/racecheck.log"
    ;;
python)
    MOEPATCH_LIB=$LIB timeout 330 python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
    LD_PRELOAD=$LIB timeout 240 python3 tests/bench/bench_moe.py --engine --no-loop --out "$OUT/bench_moe.json" \
        2>&1 | tee "$OUT/bench_moe.log" | tail -30
    ;;
axolotl)
    axolotl_env || exit 1
    # one call each (< 10 min): `axolotl` = Ring A/B (CAST_BACK=1: see ab_probe.py) + the tiny Qwen3;
    # `axolotl2` = the Qwen3-30B-A3B-architecture A/B and the two LoRA configs
    python3 $E/make_models.py --out $M 2>&1 | tee -a "$C" || exit 1
    CAST_BACK=1 MODEL=$M/ring_mini_arch RUN_TIMEOUT=230 examples/ab.sh $E/ring_mini_arch.yml 2>&1 | tee -a "$C"
    MODEL=$M/qwen3_moe_tiny RUN_TIMEOUT=90 examples/ab.sh $E/qwen3_moe_tiny.yml 2>&1 | tee -a "$C"
    tar czf "$OUT/ab_logs.tgz" -C /tmp moepatch_ab # one file: the device returns only a few files
    ;;
axolotl2)
    axolotl_env || exit 1
    python3 $E/make_models.py --out $M --only qwen30 2>&1 | tee -a "$C" || exit 1
    python3 $E/make_models.py --out $M --only ring 2>&1 | tee -a "$C" || exit 1
    MODEL=$M/qwen3_30b_arch RUN_TIMEOUT=150 examples/ab.sh $E/qwen3_30b_arch.yml 2>&1 | tee -a "$C"
    CAST_BACK=1 MODEL=$M/ring_mini_arch SIDES=B RUN_TIMEOUT=120 examples/ab.sh $E/ring_lora_attn.yml 10 2>&1 | tee -a "$C"
    CAST_BACK=1 MODEL=$M/ring_mini_arch SIDES=B RUN_TIMEOUT=150 examples/ab.sh $E/ring_lora_experts.yml 4 2>&1 | tee -a "$C"
    tar czf "$OUT/ab_logs.tgz" -C /tmp moepatch_ab
    ;;
axprof)
    axolotl_env || exit 1
    python3 $E/make_models.py --out $M --only ring 2>&1 | tee -a "$C" || exit 1
    python3 $E/make_models.py --out $M --only qwen30 2>&1 | tee -a "$C" || exit 1
    MOEPATCH_AB_PROFILE=5 CAST_BACK=1 MODEL=$M/ring_mini_arch SIDES=B RUN_TIMEOUT=200 \
        examples/ab.sh $E/ring_mini_arch.yml 8 2>&1 | tee -a "$C" | tail -4
    MODEL=$M/qwen3_30b_arch RUN_TIMEOUT=170 examples/ab.sh $E/qwen3_30b_arch.yml 30 2>&1 | tee -a "$C" |
        ab_summary
    tar czf "$OUT/ab_logs.tgz" -C /tmp moepatch_ab
    ;;
axqwen)
    axolotl_env || exit 1
    python3 $E/make_models.py --out $M --only qwen30 2>&1 | tee -a "$C" || exit 1
    python3 $E/make_models.py --out $M --only qwen 2>&1 | tee -a "$C" || exit 1
    for m in qwen3_30b_arch qwen3_moe_tiny; do
        MODEL=$M/$m RUN_TIMEOUT=170 examples/ab.sh $E/$m.yml 30 2>&1 | tee -a "$C" |
            ab_summary
    done
    tar czf "$OUT/ab_logs.tgz" -C /tmp moepatch_ab
    ;;
axnoise)
    axolotl_env || exit 1
    python3 $E/make_models.py --out $M --only ring 2>&1 | tee -a "$C" | tail -1 || exit 1
    for run in 1 2; do
        CAST_BACK=1 MODEL=$M/ring_mini_arch SIDES=A RUN_TIMEOUT=170 LOGDIR=/tmp/moepatch_ab/ring_noise_$run \
            examples/ab.sh $E/ring_mini_arch.yml "${NOISE_STEPS:-30}" 2>&1 | tee -a "$C" | grep -E "tokens/s|median step"
    done
    python3 $E/ab_report.py --name "ring_mini_arch: MOEPATCH=0 twice" \
        --a /tmp/moepatch_ab/ring_noise_1/ring_mini_arch.A.jsonl --log-a /tmp/moepatch_ab/ring_noise_1/ring_mini_arch.A.log \
        --b /tmp/moepatch_ab/ring_noise_2/ring_mini_arch.A.jsonl --log-b /tmp/moepatch_ab/ring_noise_2/ring_mini_arch.A.log \
        --json /tmp/moepatch_ab/ring_noise.json 2>&1 | tee -a "$C" | tail -40
    tar czf "$OUT/ab_logs.tgz" -C /tmp moepatch_ab
    ;;
axbig)
    axolotl_env || exit 1
    python3 $E/make_models.py --out $M --only ring 2>&1 | tee -a "$C" || exit 1
    CAST_BACK=1 MODEL=$M/ring_mini_arch RUN_TIMEOUT=280 LOGDIR=/tmp/moepatch_ab/ring_mini_arch_mb8 \
        examples/ab.sh $E/ring_mini_arch.yml 20 -- --micro-batch-size=8 2>&1 | tee -a "$C" |
        ab_summary
    tar czf "$OUT/ab_logs.tgz" -C /tmp moepatch_ab
    ;;
ncu)
    # why the engine is slower than _grouped_mm: Nsight Compute sections of its GEMM forms, one
    # invocation per GEMM so that each profiles that GEMM's first engine launch (schedule 1)
    for gm in "fwd gate_up" "fwd down" "dgrad down" "wgrad gate_up" "wgrad down"; do
        echo "=== $gm" >>"$OUT/ncu.txt"
        ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
            --section WarpStateStats --section SchedulerStats --section InstructionStats --section Occupancy \
            -k regex:sm90_gemm_kernel --launch-count 1 \
            python3 tests/bench/bench_gemm.py --shapes "${NCU_SHAPE:-ring-mini-2.0}" --reps 1 --gemms "$gm" \
            >>"$OUT/ncu.txt" 2>&1
        echo "ncu $gm rc=$?"
    done
    grep -E "^===|Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Stall|Warp Cycles Per Issued|Executed Ipc A|L2 Cache Throughput" \
        "$OUT/ncu.txt" | head -90
    ;;
ncuhot)
    # where the default (warp-specialized) kernel's warps stall, instruction by instruction
    IFS=, read -ra gms <<<"${NCU_GEMMS:-fwd gate_up,dgrad down,wgrad gate_up}"
    for gm in "${gms[@]}"; do
        echo "=== $gm" | tee -a "$OUT/ncuhot.txt"
        ncu --section SpeedOfLight --section WarpStateStats --section SourceCounters --import-source no -k regex:sm90w_gemm_kernel \
            --launch-count 1 -f -o /tmp/hot python3 tests/bench/bench_gemm.py --shapes "${NCU_SHAPE:-ring-mini-2.0}" \
            --reps 1 --gemms "$gm" --schedules "${NCU_SCHED:-0}" >/tmp/hot.log 2>&1 || tail -5 /tmp/hot.log
        ncu --import /tmp/hot.ncu-rep --page source --print-source sass --csv >/tmp/hot.csv 2>&1
        ncu --import /tmp/hot.ncu-rep --page details 2>&1 | grep -E "Duration|Throughput|Warp Cycles|Stall" >>"$OUT/ncuhot.txt"
        python3 tests/bench/ncu_hotspots.py 25 </tmp/hot.csv 2>&1 | tee -a "$OUT/ncuhot.txt"
        gzip -c /tmp/hot.csv >"$OUT/hot_${gm// /_}_s${NCU_SCHED:-0}.csv.gz"
    done
    ;;
gemmdiag)
    # where a GEMM's time goes: no loads (1), no wgmma (2), no store waits (3) beside the real build
    for round in 1 2; do
        for dir in build build/diag1 build/diag2 build/diag3; do
            [ -f "$dir/libmoepatch_cuda.so" ] || { echo "gemmdiag: no $dir/libmoepatch_cuda.so (make diag)"; continue; }
            log=$OUT/gemmdiag_$(basename "$dir")_$round.log
            timeout 60 python3 tests/bench/bench_gemm.py --lib "$dir/libmoepatch_cuda.so" --no-uniform \
                --shapes "${DIAG_SHAPES:-ring-mini-2.0}" >"$log" 2>&1
            echo "== $dir round $round rc=$? (a diagnostic build's outputs are wrong by design)"
            grep "sm90 default" "$log" | awk -F'|' '{printf "%s %s;", $3, $7} END {print ""}'
        done
    done
    ;;
decode)
    LD_PRELOAD=$LIB timeout 200 python3 tests/bench/bench_moe.py --tokens 1,8,64 --engine --no-loop \
        --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | tail -30
    ;;
ab)
    # GPU clocks differ between calls by up to ~10 %: only same-call comparisons mean anything
    PREV=${PREV:-build/prev}
    [ -f "$PREV/libmoepatch.so" ] || { echo "ab: no $PREV/libmoepatch.so (see the header)"; exit 2; }
    for round in 1 2; do
        for side in new prev; do
            dir=build
            [ $side = prev ] && dir=$PREV
            timeout 100 python3 tests/bench/bench_gemm.py --lib "$dir/libmoepatch_cuda.so" \
                --out "$OUT/gemm_${side}_$round.json" >"$OUT/gemm_${side}_$round.log" 2>&1
            echo "== $side round $round: bench_gemm rc=$?"
            grep -E "sm90 default|_grouped_mm \||bmm" "$OUT/gemm_${side}_$round.log" | grep "^|" |
                awk -F'|' '{print $2, $3, $6, $7, $8}'
            LD_PRELOAD=$PWD/$dir/libmoepatch.so timeout 100 python3 tests/bench/bench_moe.py --tokens 16384 \
                --no-loop --out "$OUT/layer_${side}_$round.json" >"$OUT/layer_${side}_$round.log" 2>&1
            grep -E "grouped_mm \||moepatch(_tf5)? \|" "$OUT/layer_${side}_$round.log"
        done
    done
    ;;
decodeab)
    # the decode C tests, then this build against PREV's (alternating) at T = 1, 8, 64, then where
    # each build's decode forward spends its GPU time (one graph replay under the profiler)
    PREV=${PREV:-build/prev}
    [ -f "$PREV/libmoepatch.so" ] || { echo "decodeab: no $PREV/libmoepatch.so (see the header)"; exit 2; }
    timeout 200 ./build/tests/test_cuda_kernels --filter='cuda_kernels/decode*' --verbose \
        >"$OUT/ctest_decode.log" 2>&1
    echo "decode C tests rc=$?"
    grep -E "FAIL|Synthesis" "$OUT/ctest_decode.log"
    for side in new prev new prev; do
        dir=build
        [ $side = prev ] && dir=$PREV
        echo "== $side"
        LD_PRELOAD=$PWD/$dir/libmoepatch.so timeout 120 python3 tests/bench/bench_moe.py --tokens 1,8,64 \
            --engine --no-loop --out "$OUT/decode_$side.json" >"$OUT/decode_$side.log" 2>&1
        sed -n '/Decode forward replayed/,$p' "$OUT/decode_$side.log" | grep -E "moepatch(_tf5)?_engine"
    done
    for side in new prev; do
        dir=build
        [ $side = prev ] && dir=$PREV
        echo "== profile $side"
        LD_PRELOAD=$PWD/$dir/libmoepatch.so timeout 120 python3 tests/bench/profile_decode.py --tokens 1,8 \
            --blocks tf5,remote >"$OUT/prof_$side.log" 2>&1
        grep -E "^==|  \+" "$OUT/prof_$side.log" | cut -c1-110
    done
    ;;
profile)
    # where a Ring training step's host and GPU time go (the 10x target of issue 5 is host-bound)
    python3 examples/axolotl/make_models.py --out /tmp/moe_models --only ring >/dev/null 2>&1 || exit 1
    for gemm in auto cublas; do
        LD_PRELOAD=$LIB timeout 150 python3 examples/profile_step.py /tmp/moe_models/ring_mini_arch --steps 5 \
            --cprofile --gemm $gemm >"$OUT/profile_$gemm.txt" 2>&1
        grep -E "step time|peak" "$OUT/profile_$gemm.txt"
    done
    # the same plain loop unpatched (the remote code's per-expert loop): the A/B without the Trainer
    MOEPATCH=0 LD_PRELOAD=$LIB timeout 150 python3 examples/profile_step.py /tmp/moe_models/ring_mini_arch \
        --steps 4 --no-profile 2>&1 | tee "$OUT/profile_off.txt" | grep -E "step time|peak"
    ;;
*)
    sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
