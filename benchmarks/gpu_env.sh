# Sourced by the GPU scripts (benchmarks/gpu_check.sh, benchmarks/gpu_tests.sh), from the
# repository's root: installs the carried wheels of benchmarks/gpu_wheels.sh (if .whl/ is
# there) into /tmp/site, puts it and the repository on PYTHONPATH, and makes $OUT.
OUT=${OUT:-/tmp/$(basename "$0" .sh)}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
