#!/usr/bin/env bash
# Rows 1 (train step), 2 (memory) and 4 (extraction) at full size on a bare
# GPU machine: JAX with CUDA, PyTorch and timm installed; no TensorFlow, no
# ScaNN and no network there. Nothing of ours needs TensorFlow on this path.
# ml_collections is the one package missing there; it travels as a wheel:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
#
# then, from the device tool: run(command="bash experiments/benchmarks/run_gpu.sh",
# carry=[".whl"], timeout_s=590). Results: $OUT/*.json and $OUT/*.log.
set -uo pipefail
OUT=${OUT:-benchmark_results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/experiments/benchmarks:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# Compiled programs are kept between the scripts (the extraction reuses models).
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1

bench() {  # name, seconds, arguments...
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" python3 "experiments/benchmarks/$name.py" --output_dir="$OUT" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $SECONDS s"
  tail -n 20 "$OUT/$name.log"
}

# The cheap rows first, so a slow compile late in the run loses the least.
bench train_step 170 --mode=full --rows=b0_224,dolg_r101_512 --iterations=10
bench step_memory 120 --mode=full --tables=head,max_batch
timeout 150 python3 experiments/benchmarks/step_memory.py --mode=full --tables=remat \
  --output_dir="$OUT/remat" > "$OUT/step_memory_remat.log" 2>&1
echo "step_memory (remat rows): exit $? after $SECONDS s"; tail -n 12 "$OUT/step_memory_remat.log"
timeout 170 python3 experiments/benchmarks/train_step.py --mode=full \
  --rows=b5_456,b7_512,dolg_b5_512 --iterations=5 --output_dir="$OUT/big" \
  > "$OUT/train_step_big.log" 2>&1
echo "train_step (big rows): exit $? after $SECONDS s"; tail -n 12 "$OUT/train_step_big.log"
bench extraction 100 --mode=full
