#!/usr/bin/env bash
# The GPU proof in three stages, each of which ends (summary written) inside its own time budget, so that one stage
# fits one 10-minute command on a GPU machine with room to spare, its build included. Run from the repo root:
#
#   bash benchmarks/gpu_proof.sh kernels-test        # stage 1: build the CUDA extension, the kernel tests alone
#   bash benchmarks/gpu_proof.sh kernels-bench       # stage 2: selftest (if present), bench_ops, bench_norm, bench_lora
#   bash benchmarks/gpu_proof.sh train sd15          # stage 3: train_memory.py, SD-1.5 at 512^2, variant by variant
#   bash benchmarks/gpu_proof.sh train sdxl          #          SDXL at 1024^2
#   bash benchmarks/gpu_proof.sh batching            # extra:   bench_trainer_batching --preset sd15
#   (old names: test = kernels-test, kernels = kernels-bench)
#
# Without a GPU every stage runs in CPU mode (the rehearsal): the same steps with the CPU and Triton-interpreter
# backends (TRITON_INTERPRET=1), bench_ops --device cpu, and train_memory on the tiny / tiny_xl architectures
# (variants naive and full unless VARIANTS says otherwise).
#
# Results go to ${OUT:-benchmarks/results/gpu}: <stage>.json (the stage summary: steps, seconds, rc, test counts,
# failures), kernels-test*.xml (JUnit), the benchmarks' JSON records, and <stage>-logs.tar.gz (every step's log). The exit status is non-zero when a
# step failed or a test failed; a step cut short by the budget is reported as "incomplete", not as a failure.
#
# Environment: PROOF_BUDGET (seconds per stage, default 540), PROOF_DEVICE (auto|cuda|cpu), PYTHON (default
# python3), TORCH_CUDA_ARCH_LIST (default: the visible GPU's), MAX_JOBS (default: all cores), PROOF_WORKERS (pytest
# -n on CUDA when pytest-xdist is there; default 4), PROOF_TEST_TIMEOUT (per-test seconds, default 120),
# VARIANTS (stage 3, comma-separated; default all), PROOF_SITE (where carried wheels go; default $TMPDIR/fnf-site).
# Packages the GPU image lacks (diffusers, kornia, expecttest: `make gpu-wheels` here, then carry .whl) are
# installed from .whl/ into PROOF_SITE, ahead of the image's own on PYTHONPATH. The extension is built in place once.
set -uo pipefail
stage=${1:?stage: kernels-test | kernels-bench | train sd15|sdxl | batching}
case "$stage" in test) stage=kernels-test ;; kernels) stage=kernels-bench ;; esac
label=$stage; [ "$stage" = train ] && label=train-${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${PROOF_BUDGET:-540}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=30                      # seconds kept for a stopped step to end (10 s after SIGINT) and the summary
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FNF_COMMIT=${FNF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat .commit 2>/dev/null || echo unknown)}
STEPS=$OUT/$label.steps.tsv     # one line per step: name, seconds, rc, log
: > "$STEPS"
status=0

left() { echo $((DEADLINE - $(date +%s) - RESERVE)); }

# step NAME LOG CMD...: run CMD with the time left in the stage (SIGINT first, so that pytest still writes its
# reports; SIGKILL 10 s later), output to the console and LOG; records seconds and rc. rc 124/130/137: out of time.
step() {
  local name=$1 log=$2; shift 2
  local budget; budget=$(left)
  if [ "$budget" -lt 10 ]; then
    printf '%s\t0\tskipped\t%s\n' "$name" "$log" >> "$STEPS"; echo "== $name: skipped, out of stage time"; return 0
  fi
  echo "== $name (up to ${budget}s)"
  local t0 rc; t0=$(date +%s)
  timeout -s INT -k 10 "$budget" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" $(( $(date +%s) - t0 )) "$rc" "$log" >> "$STEPS"
  echo "== $name: rc $rc, $(( $(date +%s) - t0 )) s"
  return "$rc"
}

# A step's rc: 0 ok; 124/130/137 out of the stage's time (incomplete, reported, not a failure); else a failure.
verdict() { case "$1" in 0|124|130|137) ;; *) status=1 ;; esac; }

summary() {
  "$PY" "$HERE/gpu_proof_summary.py" --stage "$label" --device "$DEVICE" --steps "$STEPS" --budget "$BUDGET" \
    --seconds $(( $(date +%s) - START )) --junit $([ "$stage" = kernels-test ] && ls "$OUT"/kernels-test*.xml 2>/dev/null) --out "$OUT/$label.json" || status=1
}

# --- environment ---------------------------------------------------------------------------------------------------
SITE=${PROOF_SITE:-${TMPDIR:-/tmp}/fnf-site}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "carried wheels did not install"; exit 1; }
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
DEVICE=${PROOF_DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')") || exit 1
fi
if [ "$DEVICE" = cpu ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  echo "gpu_proof: no GPU: CPU mode (CPU + Triton-interpreter backends, tiny training architectures)"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'(CUDA', torch.version.cuda, ') | device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$OUT/env.txt"

# The extension, built in place when missing or when a CUDA build is wanted and this one has no CUDA kernels.
build_extension() {
  local want_cuda=0
  [ "$DEVICE" = cuda ] && want_cuda=1
  if "$PY" -c "import sys, fnf_kernels._C as c; sys.exit(0 if (c.built_with_cuda() or not $want_cuda) else 1)" \
      2>/dev/null; then
    echo "== build: fnf_kernels._C already built"; return 0
  fi
  local mode=${FNF_CUDA:-$([ $want_cuda = 1 ] && echo 1 || echo auto)}
  local archs=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; c = torch.cuda.get_device_capability() \
if torch.cuda.is_available() else (9, 0); print(f'{c[0]}.{c[1]}')")}
  step build "$OUT/build.log" env FNF_CUDA="$mode" TORCH_CUDA_ARCH_LIST="$archs" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py build_ext --inplace
}

pytest_args() {
  # --continue-on-collection-errors: a module that fails to import (an fnf test, say) is reported as an error but
  # does not stop the kernel tests from running.
  local args=(-q -p no:cacheprovider -o "junit_family=xunit1" --continue-on-collection-errors)
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    args+=(--timeout "${PROOF_TEST_TIMEOUT:-120}")
  else
    echo "gpu_proof: pytest-timeout missing: no per-test timeout (only the stage budget)" >&2
  fi
  if [ "$DEVICE" = cuda ] && [ "${PROOF_WORKERS:-4}" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    args+=(-n "${PROOF_WORKERS:-4}")
  fi
  echo "${args[@]}"
}

case "$stage" in
  kernels-test)
    build_extension || status=1
    "$PY" -m fnf_kernels info 2>&1 | tee "$OUT/info.txt"
    # A: every kernel test not marked slow (CUDA, Triton, CPU backends vs the references in fp32/fp16/bf16, the
    # emulated CUDA cases, the API); B, in the time left: the slow kernel tests (larger fuzzing, the planted-bug
    # emulation runs, cubin compiles last). No -x: every test runs; pytest-timeout stops a hung one.
    read -r -a args <<< "$(pytest_args)"
    step "tests: kernels and not slow" "$OUT/kernels-test.log" "$PY" -m pytest "${args[@]}" -m "kernels and not slow" \
      --junitxml "$OUT/kernels-test.xml" tests
    verdict $?
    if [ "${PROOF_SLOW:-1}" = 1 ]; then
      step "tests: kernels and slow" "$OUT/kernels-test-slow.log" "$PY" -m pytest "${args[@]}" -m "kernels and slow" \
        --junitxml "$OUT/kernels-test-slow.xml" tests
      verdict $?
    fi
    ;;
  kernels-bench)
    build_extension || status=1
    if "$PY" -m fnf_kernels selftest --help >/dev/null 2>&1; then
      step selftest "$OUT/selftest.log" "$PY" -m fnf_kernels selftest --device "$DEVICE"
      verdict $?
    else
      echo "== selftest: not in this fnf_kernels (python -m fnf_kernels selftest missing), skipped"
    fi
    if [ "$DEVICE" = cuda ]; then
      step bench_ops "$OUT/bench_ops.log" "$PY" benchmarks/bench_ops.py --device cuda --json "$OUT/ops_cuda.json"
      verdict $?
      # group_norm_silu / rms_norm_silu vs eager and torch.compile, with the bytes-moved limit (issue 26 item 6).
      step bench_norm "$OUT/bench_norm.log" "$PY" benchmarks/bench_norm.py --device cuda --min-run-time 0.3 \
        --json "$OUT/norm_cuda.json"; verdict $?
      step bench_lora "$OUT/bench_lora.log" "$PY" benchmarks/bench_lora.py --json "$OUT/lora_cuda.json"; verdict $?
    else
      # CPU mode: the Triton interpreter is not benchmarked (TRITON_INTERPRET unset: Triton is then unavailable).
      step bench_ops "$OUT/bench_ops.log" env -u TRITON_INTERPRET "$PY" benchmarks/bench_ops.py --device cpu --min-run-time 0.05 \
        --no-compile --json "$OUT/ops_cpu.json"; verdict $?
      step bench_norm "$OUT/bench_norm.log" env -u TRITON_INTERPRET "$PY" benchmarks/bench_norm.py --device cpu \
        --min-run-time 0.05 --json "$OUT/norm_cpu.json"; verdict $?
      step bench_lora "$OUT/bench_lora.log" "$PY" benchmarks/bench_lora.py ; verdict $?   # says GPU-only, exits 0
    fi
    ;;
  train)
    model=${2:?train needs a model: sd15 | sdxl}
    label=train-$model
    build_extension || status=1
    if [ "$DEVICE" = cpu ]; then
      case "$model" in sd15) arch=tiny ;; sdxl) arch=tiny_xl ;; *) arch=$model ;; esac
      extra=(--device cpu --steps 2 --sampling-steps 3)
    else
      arch=$model; extra=(--device cuda)
    fi
    # CPU mode: two variants by default (the rehearsal exercises the stage; the ladder is for the GPU).
    [ "$DEVICE" = cpu ] && VARIANTS=${VARIANTS:-naive,full}
    variants=${VARIANTS:-$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import train_memory as t; \
print(','.join(t.ALL_VARIANTS))")}
    # One process per variant: a variant that runs out of the stage's time loses only itself; the records are
    # merged into train_memory_<model>.json, and the summary lists the variants that did not run.
    IFS=, read -r -a names <<< "$variants"
    for v in "${names[@]}"; do
      safe=$(echo "$v" | tr -c 'A-Za-z0-9_\n' '_')
      step "train_memory $arch $v" "$OUT/train_memory_${model}_$safe.log" "$PY" benchmarks/train_memory.py \
        --model "$arch" --variants "$v" "${extra[@]}" --json "$OUT/train_memory_${model}_$safe.json"
      verdict $?
    done
    "$PY" - "$OUT" "$model" "${names[@]}" <<'EOF'
import json, os, re, sys
out, model, names = sys.argv[1], sys.argv[2], sys.argv[3:]
records = []
for v in names:
    path = os.path.join(out, f"train_memory_{model}_{re.sub(r'[^A-Za-z0-9_]', '_', v)}.json")
    if os.path.exists(path):
        records += json.load(open(path))
        os.remove(path)
json.dump(records, open(os.path.join(out, f"train_memory_{model}.json"), "w"), indent=1)
print(f"train_memory_{model}.json: {len(records)} records ({', '.join(r['variant'] for r in records)})")
EOF
    ;;
  batching)
    build_extension || status=1
    step bench_trainer_batching "$OUT/bench_trainer_batching.log" "$PY" benchmarks/bench_trainer_batching.py \
      --preset "$([ "$DEVICE" = cuda ] && echo sd15 || echo tiny)" --device "$DEVICE" \
      --json "$OUT/trainer_batching_$DEVICE.json"; verdict $?
    ;;
  *)
    echo "unknown stage $stage (kernels-test | kernels-bench | train sd15|sdxl | batching)" >&2; exit 2 ;;
esac
summary
# Few files in $OUT (a device call brings back at most 8): the logs, env and step files go into one archive, the
# summary, JUnit files and benchmark records stay as they are. PROOF_PACK=0 keeps them loose.
if [ "${PROOF_PACK:-1}" = 1 ]; then
  (cd "$OUT" && loose=$(ls -- *.log *.txt "$label.steps.tsv" 2>/dev/null) \
    && tar czf "$label-logs.tar.gz" $loose && rm -f $loose && echo "logs: $OUT/$label-logs.tar.gz")
fi
exit $status
