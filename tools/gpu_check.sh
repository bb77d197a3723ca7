#!/usr/bin/env bash
# The GPU figures of issue 16 in one call on the lent GPU machine (../shared/device/README.md):
# k-means vs scikit-learn, mining throughput (R50, 640 px), decoder training vs Hugging Face
# Mask2Former (bf16, host-sync count) and the GPU-path tests. Everything lands under $OUT.
#
# Here, once (the .whl folder is git-ignored):
#   ../shared/device/fetch_wheels.sh .whl       # detectron2 and the small deps
#   bash tools/gpu_check.sh --fetch-hf          # + transformers for the decoder's HF column (~26 MB)
# Then one device call (well inside its 10 minutes; each step has its own timeout):
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Summary: $OUT/summary.txt; full logs and JSON figures: $OUT/<step>.log / <step>.json.
set -uo pipefail

if [ "${1:-}" = "--fetch-hf" ]; then
    # Pure-Python wheels plus the few cp312 binaries transformers needs; numpy/torch are there already.
    mkdir -p .whl/hf
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl/hf transformers==5.23.0 || exit 1
    rm -f .whl/hf/numpy-*.whl
    du -sh .whl .whl/hf
    exit 0
fi

OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
ls .whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl: run ../shared/device/fetch_wheels.sh .whl here first" | tee "$summary"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl \
    $(ls .whl/hf/*.whl 2>/dev/null) > "$OUT/pip.log" 2>&1 || { echo "pip install failed (see pip.log)" | tee "$summary"; exit 1; }
export PYTHONPATH=$PWD/.site:$PWD DETECTRON2_DATASETS=$PWD/datasets
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
echo "$(date -u) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" > "$summary"

step() {  # step NAME SECONDS CMD...: run with a timeout, log to $OUT/NAME.log, note rc + tail in summary
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$summary"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "rc=$rc after $((SECONDS - t0)) s" | tee -a "$summary"
    grep -v -i "warn" "$OUT/$name.log" | tail -n 25 >> "$summary"
}

# k-means goal: >= 20,000 inst/s at 1024 px x 1152 d, k=4, 10 iterations (fp32, then bf16 distances).
step kmeans 90 python3 tools/benchmark_kmeans.py --device cuda --instances 2000 --dims 256,1152 \
    --metrics l2,cosine --sklearn-instances 50 --json "$OUT/kmeans.json"
step kmeans_bf16 60 python3 tools/benchmark_kmeans.py --device cuda --instances 2000 --dims 1152 \
    --metrics l2,cosine --distance-dtype bfloat16 --skip-sklearn --json "$OUT/kmeans_bf16.json"
# Mining goal: >= 100 img/s for R50 at 640 px, features to stored RLE, with the breakdown
# (parts_world_val has 100 images: one warm-up batch + 80 timed).
step mining 130 python3 tools/benchmark_mining.py --features res3_res4 --backbone r50 --device cuda \
    --image-size 640 --num-images 80 --batch-size 16 --json "$OUT/mining.json"
# Decoder goal: ours <= 0.8x HF Mask2Former's time per iteration (R50, 640^2, batch 16, 200 queries,
# 10 layers), zero host syncs.
step decoder 150 python3 tools/benchmark_decoder.py --device cuda --bf16 --iters 20 --warmup 5 --check-host-syncs
# GPU-path tests (marker "gpu"; they skip without CUDA).
step tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/
echo "done $(date -u), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$summary"
