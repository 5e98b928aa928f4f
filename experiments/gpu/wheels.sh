#!/usr/bin/env bash
# Wheels of the packages the benchmark needs and a GPU image may lack (ml_collections; trl, with
# datasets and datasets' dill and multiprocess), downloaded into .whl/ for that image's Python.
#
#   bash experiments/gpu/wheels.sh            # for Python 3.12 (PY=3.11 for another)
#
# Then, on the GPU machine, from the repository root (experiments/gpu/bench.sh does this):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 -m experiments.bench ...
# The image is assumed to hold jax (CUDA), flax, optax, orbax-checkpoint, transformers, torch,
# accelerate, pyarrow, pandas, xxhash, fsspec and absl-py; apo_jax itself runs from the checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${PY:-3.12}"
exclude="$(git rev-parse --git-path info/exclude)"  # .whl/ travels with the tree but is never committed
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${platforms[@]}" -d .whl ml_collections "trl>=1.16" datasets dill multiprocess
ls -1 .whl
