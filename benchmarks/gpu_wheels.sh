#!/usr/bin/env bash
# Fetches (here, where pip can reach an index) the wheels that benchmarks/gpu_check.sh
# needs on the device machine, whose image lacks grain, tensorflow-datasets and their
# needs, into .whl/ (ignored by git; the device tool carries it: carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 importlib_resources \
  tensorflow-datasets==4.9.10 dm-tree immutabledict simple_parsing docstring-parser \
  tensorflow-metadata googleapis-common-protos termcolor toml
python3 -m pip wheel -q --no-deps -w .whl promise==2.3  # an sdist only: built here
du -sh .whl
