#!/usr/bin/env bash
# The exactness tests on a GPU: the numpy-reference tests of the tally, masks, ties,
# segmentation, quantiles and engine, compiled for the GPU instead of the suite's 8 CPU
# devices (tests/conftest.py leaves JAX_PLATFORMS to the caller). XLA's GPU code fuses
# and rounds differently from its CPU code, and planted ties sit on the rounding edge:
# this shows whether the counts still equal the references there. Tests that need 8
# devices skip or fail for want of them (one GPU); read failures with that in mind.
#
# Needs the wheels of benchmarks/gpu_wheels.sh (device tool):
#   run(command="bash benchmarks/gpu_tests.sh", carry=[".whl"], timeout_s=300)
# GPU_TESTS_TIMEOUT (default 240) bounds the pytest run, in seconds.
set -uo pipefail
source benchmarks/gpu_env.sh
# Several test processes share the GPU: none may take most of its memory up front. Every
# test compiles with XLA's optimisations, as users' runs do (the suite's default drops
# LLVM's on CPU to compile faster: tests/conftest.py).
export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DISABLE_MOST_OPTIMIZATIONS=0
timeout "${GPU_TESTS_TIMEOUT:-240}" python3 -m pytest -p no:cacheprovider -n 8 -rfEs \
  tests/test_tally.py tests/test_masks.py tests/test_ties.py tests/test_segment.py \
  tests/test_unit_reduce.py tests/test_quantiles.py tests/test_engine.py 2>&1 \
  | tee "$OUT/tests.txt"
