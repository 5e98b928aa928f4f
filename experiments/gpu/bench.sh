#!/usr/bin/env bash
# The GPU benchmark (README, "Performance"): carried wheels installed apart, then the 1B shape at
# T = 2048 in bf16 against TRL, and a CPU-vs-GPU check of the step's numbers. Results go to $OUT
# (the device tool's folder) or ./bench_out.
#
#   bash experiments/gpu/wheels.sh   # here, once: .whl/ (carry it)
#   bash experiments/gpu/bench.sh    # there
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-bench_out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
# the smoke run first: every part at the tiny shape, with the TRL agreement check (exit 1 if not)
python3 -m experiments.bench --smoke --out "$out/bench_smoke_gpu.json" 2>&1 | tee "$out/smoke.log"
# the same smoke run on the CPU: the GPU path must give the CPU's numbers
JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= python3 -m experiments.bench --smoke --parts step \
    --out "$out/bench_smoke_cpu.json" > "$out/smoke_cpu.log" 2>&1
python3 -m experiments.gpu.compare "$out/bench_smoke_gpu.json" "$out/bench_smoke_cpu.json" | tee "$out/compare.txt"
python3 -m experiments.bench --shape 1b --length 2048 --batch 8 --dtype bfloat16 --remat dots_no_batch \
    --attention cudnn --out "$out/bench_h100.json" 2>&1 | tee "$out/bench.log"
# the compiled per-device memory of the paper variant's step at 1B on this one GPU, beside the CPU
# compiler's plan for one device (README, "Memory, compiled": is CPU's plan a fair proxy?)
python3 -m experiments.bench.memory --shape 1b --setting paper --devices 1 --platform gpu 2>&1 | tee "$out/memory_gpu.txt"
JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= python3 -m experiments.bench.memory --shape 1b --setting paper \
    --devices 1 --platform cpu 2>&1 | tee "$out/memory_cpu.txt"
