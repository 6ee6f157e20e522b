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
.PHONY: gpu-wheels
gpu-wheels: $(PY)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl diffusers==0.42.1 kornia==0.9.0 kornia_rs==0.2.0 importlib_metadata==10.2.0 zipp

# The dependency floors of setup.py (ci/floors.txt) installed together in their own venv, then the fnf tests on
# them (kernels use their torch fallbacks there: FNF_NO_EXTENSION=1 skips the C++ build).
FLOOR_VENV ?= .venv-floor
FLOOR_TESTS ?= tests/test_fnf_train.py tests/test_fnf_models.py tests/test_fnf_sampling.py tests/test_configs.py \
  tests/test_fnf_config.py tests/test_fnf_localize.py tests/test_fnf_checkpoint.py tests/test_localizers_vit.py \
  tests/test_reward_models_clip.py tests/test_reward_models_hps_safety.py tests/test_fnf_eval.py \
  tests/test_families_unet.py tests/test_families_flow.py tests/test_family_sd3.py tests/test_family_flux.py \
  tests/test_text_encoder_placement.py tests/test_quantize.py tests/test_fnf_fsdp.py tests/test_fnf_distributed.py \
  tests/test_reference_pool_filter.py
.PHONY: floor-check
floor-check:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip --disable-pip-version-check install -q -c ci/floors.txt "setuptools>=64" wheel \
	  torch numpy diffusers peft accelerate transformers safetensors tqdm PyYAML Pillow matplotlib pytest hypothesis \
	  expecttest onnx onnxruntime
	FNF_NO_EXTENSION=1 $(FLOOR_VENV)/bin/python -m pip --disable-pip-version-check install -q --no-build-isolation \
	  --no-deps -e .
	$(FLOOR_VENV)/bin/python -m pip --disable-pip-version-check list 2>/dev/null | grep -iE "^(torch|diffusers|peft|accelerate|transformers) "
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $(FLOOR_TESTS)

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
