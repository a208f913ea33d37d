#!/usr/bin/env bash
# The engine's GPU measurements in one run, for a session lent a GPU machine.
#
# The device image has JAX, Flax, optax, orbax, PIL, safetensors, jinja2 and
# matplotlib, but not grain, tensorflow-datasets and some of their needs: fetch
# them once here with `bash benchmarks/gpu_wheels.sh` (11 MB into .whl/),
# then (device tool): run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Prints, and writes under $OUT, most wanted first (what a run cut short leaves under
# $OUT still comes back): the whole dissection against a forward pass for ResNet-18
# layer4 at 224 (bench_engine) decoding in threads, then in processes; the main job
# (experiments/dissect.py's defaults: Lite0, 5 layers, report) in two new processes,
# its compile share (bench_compile); Lite0's five layers with the report (bench_engine);
# the tally methods at Broden's sizes (bench_tally); the loader alone (bench_data).
# Its figures of 2026-12-04 (H200, ~380 s for the first three parts then) are in
# benchmarks/README.md. `bash benchmarks/gpu_tests.sh` runs the exactness tests there.
# GPU_CHECK_IMAGES (default 1024) sets the smallest size of bench_engine's runs
# (it runs 1x and 2x); GPU_CHECK_WORKERS (default: cores - 2) the decoding processes;
# GPU_CHECK_TALLY_BATCH (default 128) bench_tally's batch.
set -uo pipefail
source benchmarks/gpu_env.sh
images=${GPU_CHECK_IMAGES:-1024}
workers=${GPU_CHECK_WORKERS:-$(($(nproc) > 3 ? $(nproc) - 2 : 1))}
cache=/tmp/jaxdissect_bench
{
  date -u
  nproc
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/machine.txt"
engine() {
  python3 benchmarks/bench_engine.py --num_images "$images" --multiples 1,2 --batch_size 128 \
    --cache_dir "$cache" --loader_workers "$1" --notorch 2>&1 | tee "$OUT/engine_workers$1.txt"
}
engine 0
engine "$workers"
python3 benchmarks/bench_compile.py --cache_dir "$cache/main_job" 2>&1 | tee "$OUT/main_job.txt"
python3 benchmarks/bench_engine.py --arch efficientnet_lite0 --weights pretrained --report \
  --num_images "$images" --multiples 1 --repeats 1 --batch_size 128 --cache_dir "$cache" \
  --notorch 2>&1 | tee "$OUT/lite0_report.txt"
python3 benchmarks/bench_tally.py --batch_size "${GPU_CHECK_TALLY_BATCH:-128}" 2>&1 \
  | tee "$OUT/tally.txt"
python3 benchmarks/bench_data.py --num_images "$images" --threads 2,4 --workers "$workers" \
  --reads all,labels --repeats 1 --cache_dir "$cache/data" 2>&1 \
  | grep -v -E "Generating|Shuffling|\[A" | tee "$OUT/data.txt"
