#!/usr/bin/env bash
# Load, export and run at a released model's exact size (random weights), with wall time and peak RSS per step.
#
#   benchmarks/released_size.sh WORKDIR [PRESET] [STEPS]
#     PRESET  stablelm-1.6b-4e (default) | stablelm-1.6b-4e-384 | phi2-2.7b-4e | phi2-2.7b-4e-384 | qwen-1.8b-4e
#     STEPS   space-separated subset, in this order by default:
#             write run-torch export-fp32 run-fp32 export-fp16 run-fp16 export-int4 run-int4 export-int8
#             run-int8 bench
#
# Each step runs under /usr/bin/time -v (log: WORKDIR/logs/STEP.log); its wall time and peak RSS are printed
# and appended to WORKDIR/figures.tsv. Needs ~40 GB of disk for StableLM-1.6B-4e (checkpoint 6.4 GB, fp32 export
# 12.8 GB, fp16 6.4 GB) and ~15 GB of RAM (PyTorch fp32, the fp32 export, the runtime on either export). The fp32
# and fp16 exports skip validation here (--no-validate); the int4 / int8 exports are validated against PyTorch
# fp32 (greedy, router and part figures; --pope-per-split 0: each POPE probe costs seconds at this size).
# THREADS (default 2) sets both backends' threads.
set -euo pipefail
WORK=${1:?usage: released_size.sh WORKDIR [PRESET] [STEPS]}
PRESET=${2:-stablelm-1.6b-4e}
STEPS=${3:-write run-torch export-fp32 run-fp32 export-fp16 run-fp16 export-int4 run-int4 export-int8 run-int8 bench}
THREADS=${THREADS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=$ROOT/tests/assets/shapes_96x60.png
PROMPT="What is in the image?"
CKPT=$WORK/ckpt
mkdir -p "$WORK/logs"
export OMP_NUM_THREADS=$THREADS PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME CMD...: run under time -v, print and record wall time + peak RSS
    local name=$1; shift
    echo "== $name: $*"
    /usr/bin/time -v "$@" > "$WORK/logs/$name.log" 2>&1 || { echo "$name failed, see $WORK/logs/$name.log"; return 1; }
    local wall rss
    wall=$(grep "Elapsed (wall clock)" "$WORK/logs/$name.log" | awk '{print $NF}')
    rss=$(grep "Maximum resident" "$WORK/logs/$name.log" | awk '{printf "%.2f", $NF / 1048576}')
    echo "   wall $wall, peak RSS $rss GB"
    printf '%s\t%s\t%s\t%s\n' "$PRESET" "$name" "$wall" "$rss" >> "$WORK/figures.tsv"
    grep -E '^\{' "$WORK/logs/$name.log" | tail -1 || true   # moe-run --json timings
}

run_engine() { step "run-$1" moe-run --engine-dir "$WORK/$1" --image "$IMAGE" --prompt "$PROMPT" --max-new-tokens 8 --json; }

for s in $STEPS; do
    case $s in
        write)       step write python "$ROOT/benchmarks/moe_scaling.py" --write-checkpoint "$CKPT" --preset "$PRESET" ;;
        run-torch)   step run-torch moe-run --model "$CKPT" --image "$IMAGE" --prompt "$PROMPT" --max-new-tokens 8 --json ;;
        export-fp*)  p=${s#export-}; rm -rf "${WORK:?}/$p"
                     step "$s" moe-export --model "$CKPT" --target onnx --precision "$p" --no-validate --out "$WORK/$p" ;;
        export-int*) p=${s#export-}; rm -rf "${WORK:?}/$p"
                     step "$s" moe-export --model "$CKPT" --target onnx --precision "$p" --pope-per-split 0 --out "$WORK/$p" ;;
        run-*)       run_engine "${s#run-}" ;;
        bench)       step bench moe-bench --model "$CKPT" --engine-dir "$WORK/int4" --max-new-tokens 16 --runs 1 \
                         --warmup 0 --threads "$THREADS" --image "$IMAGE" --json "$WORK/bench.json" ;;
        *)           echo "unknown step $s"; exit 2 ;;
    esac
done
