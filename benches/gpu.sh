#!/usr/bin/env bash
# The GPU figures of the burn-cuda path, in one command, on a machine with an NVIDIA GPU and its
# driver, Python with torch, transformers and peft (nothing is fetched: the models are random
# weights of the shapes that matter, made on the machine):
#
#   benches/gpu.sh [SHAPES] [OUT]        e.g. benches/gpu.sh 1.5b,7b,13b /tmp/gpu-run
#
# It needs `codelsi-bench` built with CUDA (cudarc loads libcuda at run time: no CUDA toolkit
# at build time, so it can be built on any Linux machine and copied over):
#   cargo build --release -p codelsi-benches --features cuda
# and uses target/release/codelsi-bench, or $CODELSI_BENCH.
#
# For each shape (default 1.5b,7b,13b), in this order, each printing one line:
#  1. make_random_llama.py: a random bf16 HF folder of the shape (13b: 26 GB of disk).
#  2. vs-cpu (1.5b only): the CUDA path's last logits against the CPU path's on the same file,
#     the base in f32 (fails past 1e-2 of the largest logit), then in bf16 on both sides (the
#     CUDA products in bf16: fails past 5e-2).
#  3. codelsi-bench train --device cuda: LoRA r=16 alpha=32 on all seven projections, one
#     512-token row a step, bf16 base, tokens/s and peak device memory after a warm-up step.
#  4. peft_baseline.py --dtype bf16: PEFT + transformers on the same GPU, same row, rank,
#     targets and optimiser: tokens/s and CUDA max allocated.
#  5. with more than one GPU (nvidia-smi -L): train --replicas N, data parallel on cuda:0..N-1.
# Then the wgpu (Vulkan) path's decode/prefill on the 1.5b shape, where a Vulkan driver exists.
# With WORKLOAD=1 (and 13b among the shapes), last: the paper's workload scaled, `codelsi train`
# on the 13B shape, 20K instruction records (MBTSP's, repeated) x 3 epochs, r=16 alpha=32, its
# wall time; it needs `codelsi` built with CUDA too ($CODELSI, default target/release/codelsi).
# Everything goes to OUT/gpu.log too.
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPES="${1:-1.5b,7b,13b}"
OUT="${2:-/tmp/codelsi-gpu}"
BENCH="${CODELSI_BENCH:-target/release/codelsi-bench}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
[ -x "$BENCH" ] || { echo "no $BENCH: cargo build --release -p codelsi-benches --features cuda"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
GPUS=$(nvidia-smi -L | wc -l)
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

for shape in ${SHAPES//,/ }; do
    dir="$OUT/random-$shape"
    echo "== $shape"
    "$PY" benches/make_random_llama.py --shape "$shape" --out "$dir" || continue
    if [ "$shape" = 1.5b ]; then
        "$BENCH" vs-cpu --device cuda --model "$dir" --base-dtype quantized
        "$BENCH" vs-cpu --device cuda --model "$dir" --base-dtype bf16 --tol 5e-2
    fi
    "$BENCH" train --device cuda --model "$dir" --seq 512 --steps 3 --base-dtype bf16
    "$PY" benches/peft_baseline.py --hf "$dir" --device cuda --dtype bf16 --seq 512 --steps 3
    if [ "$GPUS" -gt 1 ]; then
        "$BENCH" train --device cuda --replicas "$GPUS" --model "$dir" --seq 512 --steps 3 --base-dtype bf16
    fi
    # The 7b and 13b folders take 13 and 26 GB: keep the disk for the next shape.
    [ "$shape" = 1.5b ] || { [ "$shape" = 13b ] && [ "${WORKLOAD:-0}" = 1 ]; } || rm -rf "$dir"
done

if [ -d "$OUT/random-1.5b" ]; then
    echo "== wgpu (Vulkan) on the 1.5b shape"
    "$BENCH" model --model "$OUT/random-1.5b" --batches 1,32 || echo "(no Vulkan driver for wgpu here)"
fi

if [ "${WORKLOAD:-0}" = 1 ] && [ -d "$OUT/random-13b" ]; then
    echo "== the paper's workload on the 13b shape: 20K records x 3 epochs"
    CODELSI="${CODELSI:-target/release/codelsi}"
    "$PY" benches/make_mbtsp_instructions.py engine/suites/mbpp-ts.jsonl "$OUT/mbtsp"
    "$PY" - "$OUT/mbtsp/mbtsp-train.jsonl" "$OUT/ts20k.jsonl" <<'PY'
import sys
rows = open(sys.argv[1]).read().splitlines()
with open(sys.argv[2], "w") as f:
    f.write("\n".join(rows[i % len(rows)] for i in range(20000)) + "\n")
PY
    start=$(date +%s)
    "$CODELSI" --device cuda train --model "$OUT/random-13b" --data "$OUT/ts20k.jsonl" \
        --val "$OUT/mbtsp/mbtsp-val.jsonl" --out "$OUT/adapter-13b" --rank 16 --alpha 32 \
        --epochs 3 --batch 16 --max-len 512 --base-dtype bf16 --format json | tail -1
    echo "workload wall time: $(( $(date +%s) - start )) s (the paper: under an hour on 2xA100)"
fi
