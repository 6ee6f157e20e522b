# focus-n-fix developer entry points. `make test` works from a bare machine: it makes a venv, installs
# torch==2.13.0 when the venv has no torch, builds the package with its C++ (and, with CUDA, CUDA)
# extension, and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
EXTRAS ?= train,test,bench
export MAX_JOBS ?= 2

.PHONY: install test test-fast bench info clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q "setuptools>=64" wheel ninja
	$(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	$(PY) -m fnf_kernels info

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/bench_ops.py

info:
	$(PY) -m fnf_kernels info

clean:
	rm -rf build dist *.egg-info fnf_kernels/_C*.so

# The main job on the embedded toy model: DRaFT vs Focus-N-Fix, report in runs/demo/report.md.
.PHONY: demo
demo: install
	$(PY) -m fnf demo --out runs/demo

# Wheels of what the GPU machine's image lacks, for benchmarks/gpu_proof.sh (carry .whl in the device call).
GPU_WHEELS ?= diffusers==0.42.1 kornia==0.9.0 kornia_rs==0.2.0 importlib_metadata==10.2.0 expecttest==0.3.0
.PHONY: gpu-wheels
gpu-wheels: $(PY)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

# The GPU proof rehearsed on CPU: a Python 3.12 venv with the GPU image's versions (ci/gpu-image.txt: torch 2.11
# CUDA build, triton 3.6, numpy 2.5, transformers 5.17, ...), the carried wheels of `make gpu-wheels` installed the
# way the device call installs them, and every stage of benchmarks/gpu_proof.sh run in CPU mode in a copy of the
# tree (build/gpu-rehearsal, as the device gets one), results in build/gpu-rehearsal-out. Times printed per stage.
GPU_PYTHON ?= $(or $(shell for c in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
  $$c --version >/dev/null 2>&1 && { echo $$c; break; }; done),python3.12)
GPU_VENV ?= build/venv-gpu
GPU_PY = $(abspath $(GPU_VENV))/bin/python
GPU_STAGES ?= kernels-test kernels-bench "train sd15" "train sdxl"
.PHONY: gpu-venv gpu-rehearsal
gpu-venv:
	test -x $(GPU_PY) || $(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip --disable-pip-version-check install -q -c ci/gpu-image.txt "setuptools>=64" wheel ninja torch \
	  triton numpy transformers accelerate safetensors huggingface_hub tokenizers onnx onnxruntime peft pytest \
	  pytest-timeout pytest-xdist pytest-benchmark hypothesis PyYAML tqdm Pillow matplotlib regex requests filelock
gpu-rehearsal: gpu-venv gpu-wheels
	mkdir -p build/gpu-rehearsal build/gpu-rehearsal-out
	find build/gpu-rehearsal -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null \
	  | tar -xf - -C build/gpu-rehearsal
	cp -r .whl build/gpu-rehearsal/
	cd build/gpu-rehearsal && for s in $(GPU_STAGES); do \
	  /usr/bin/env time -f "gpu_proof $$s: %e s" env OUT=$(abspath build/gpu-rehearsal-out) PYTHON=$(GPU_PY) \
	    PROOF_SITE=$(abspath build/gpu-rehearsal-site) bash benchmarks/gpu_proof.sh $$s || true; done

# The dependency floors of setup.py (ci/floors.txt: torch 2.11 (PyPI's CUDA build, run on the CPU), triton, numpy,
# diffusers, transformers, peft, accelerate, ...) installed together in their own venv; a copy of the working tree
# (build/floor-src, so that its in-place fnf_kernels._C never replaces the main venv's) gets the C++ extension built
# against that torch (CPU kernels: FNF_CUDA=0; the CUDA build is proven by `make cuda-build-check` and on the GPU by
# benchmarks/gpu_proof), and every test not marked slow runs there (selected by marker, not by file name).
FLOOR_VENV ?= .venv-floor
FLOOR_PY = $(abspath $(FLOOR_VENV))/bin/python
FLOOR_SRC ?= build/floor-src
FLOOR_MARKERS ?= not slow
FLOOR_PYTEST_ARGS ?=
.PHONY: floor-check floor-venv
floor-venv:
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip --disable-pip-version-check install -q -c ci/floors.txt "setuptools>=64" wheel ninja \
	  torch triton numpy diffusers peft accelerate transformers safetensors tqdm PyYAML Pillow matplotlib pytest \
	  hypothesis expecttest onnx onnxruntime
	$(FLOOR_PY) -m pip --disable-pip-version-check list 2>/dev/null \
	  | grep -iE "^(torch|triton|numpy|diffusers|peft|accelerate|transformers) "
floor-check: floor-venv
	mkdir -p $(FLOOR_SRC)
	find $(FLOOR_SRC) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C $(FLOOR_SRC)
	cd $(FLOOR_SRC) && FNF_CUDA=0 $(FLOOR_PY) setup.py -q build_ext --inplace
	cd $(FLOOR_SRC) && FNF_NO_EXTENSION=1 $(FLOOR_PY) -m pip --disable-pip-version-check install -q \
	  --no-build-isolation --no-deps -e .
	rm -f $(FLOOR_SRC)/fnf_kernels/_build.json   # the extension was built above: not a "skipped on purpose" install
	cd /tmp && $(FLOOR_PY) -c "import fnf_kernels._C as c, torch, os; \
	  assert os.path.realpath(c.__file__).startswith('$(abspath $(FLOOR_SRC))'), c.__file__; \
	  print('floor:', torch.__version__, 'fnf_kernels._C built with torch', torch.__version__, 'at', c.__file__)"
	cd $(FLOOR_SRC) && $(FLOOR_PY) -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
	  -m "$(FLOOR_MARKERS)" $(FLOOR_PYTEST_ARGS) tests

# The CUDA build, proven without a GPU: a separate venv with the CUDA build of torch 2.13.0 (~5 GB, made once), a
# wheel built from a clean clone of HEAD with FNF_CUDA=1 for sm_80 and sm_90, installed, imported, every compiled op
# registered for CUDA, the wheel's .so holding device code for both (ci/cuda_build_check.py).
CUDA_VENV ?= .venv-cuda
CUDA_ARCHS ?= 8.0;9.0
CUDA_PY = $(abspath $(CUDA_VENV))/bin/python
.PHONY: cuda-venv cuda-build-check
cuda-venv:
	test -x $(CUDA_PY) || { $(PYTHON) -m venv $(CUDA_VENV) && $(CUDA_PY) -m pip --disable-pip-version-check install -q \
	  "torch==2.13.0,!=2.13.0+cpu" numpy "setuptools>=64" wheel ninja; }
cuda-build-check: cuda-venv
	rm -rf build/cuda-check && git clone -q . build/cuda-check
	cd build/cuda-check && FNF_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(CUDA_PY) -m pip --disable-pip-version-check \
	  wheel -q --no-build-isolation --no-deps -w dist .
	$(CUDA_PY) -m pip --disable-pip-version-check install -q --force-reinstall --no-deps build/cuda-check/dist/focus_n_fix-*.whl
	cd /tmp && TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(CUDA_PY) $(abspath ci/cuda_build_check.py) \
	  $(abspath build/cuda-check/dist)/focus_n_fix-*.whl
