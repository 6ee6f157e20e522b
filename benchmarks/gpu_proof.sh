#!/usr/bin/env bash
# The GPU proof (issue 7) in stages that each fit one 10-minute device call. Run from the repo root on a CUDA
# machine; results (JSON records and logs) go to ${OUT:-benchmarks/results/gpu}.
#
#   bash benchmarks/gpu_proof.sh test          # build the CUDA extension, whole test suite (CUDA + Triton, bf16)
#   bash benchmarks/gpu_proof.sh kernels       # bench_ops (penalty, dilation) + bench_lora, JSON records
#   bash benchmarks/gpu_proof.sh batching      # bench_trainer_batching --preset sd15
#   bash benchmarks/gpu_proof.sh train sd15    # train_memory.py on SD-1.5 at 512^2 (all variants)
#   bash benchmarks/gpu_proof.sh train sdxl    # train_memory.py on SDXL at 1024^2
#
# Packages the GPU image lacks (diffusers, kornia, ...) travel as wheels in .whl/ (`make gpu-wheels` here first,
# then carry .whl); they are installed to /tmp/site. The extension is built in place once per machine.
set -euo pipefail
stage=${1:?stage: test | kernels | batching | train MODEL}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FNF_COMMIT=${FNF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat .commit 2>/dev/null || echo unknown)}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import fnf_kernels._C as c, sys; sys.exit(0 if c.built_with_cuda() else 1)" 2>/dev/null; then
  FNF_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace 2>&1 | tail -5
fi
$PY -m fnf_kernels info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

case "$stage" in
  test)
    $PY -m pytest -q -p no:cacheprovider -x --timeout 900 tests 2>&1 | tee "$OUT/pytest.log"
    ;;
  kernels)
    $PY benchmarks/bench_ops.py --device cuda --json "$OUT/ops_cuda.json" 2>&1 | tee "$OUT/bench_ops.log"
    $PY benchmarks/bench_lora.py --json "$OUT/lora_cuda.json" 2>&1 | tee "$OUT/bench_lora.log"
    ;;
  batching)
    $PY benchmarks/bench_trainer_batching.py --preset sd15 --json "$OUT/trainer_batching_cuda.json" 2>&1 \
      | tee "$OUT/bench_trainer_batching.log"
    ;;
  train)
    model=${2:?train needs a model: sd15 | sdxl}
    $PY benchmarks/train_memory.py --model "$model" --json "$OUT/train_memory_$model.json" 2>&1 \
      | grep -v "should be kept in float32" | tee "$OUT/train_memory_$model.log"
    ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
