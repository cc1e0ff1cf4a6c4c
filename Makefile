VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PROMPT := Is there a circle in the image?
# The trained demo model ships in moe_llava/assets/demo; a checkout without it falls back to a randomly
# initialised model of the same shape (the demo says so, and its answers are noise).
ifneq ($(wildcard moe_llava/assets/demo/config.json),)
DEMO_MODEL := demo
DEMO_IMAGE := moe_llava/assets/demo/example.png
else
DEMO_MODEL := out/random-demo
DEMO_IMAGE := tests/assets/shapes_96x60.png
endif

.PHONY: install demo test gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded demo model: export to ONNX (validated against PyTorch), answer with the
# torch-free runtime, then the same question through PyTorch for comparison.
demo: install
ifneq ($(DEMO_MODEL),demo)
	@echo "NOTE: no trained demo model in this checkout: using a RANDOMLY INITIALISED model (answers are noise)"
	$(PY) benchmarks/moe_scaling.py --write-checkpoint $(DEMO_MODEL) --preset mini --experts 4
endif
	$(VENV)/bin/moe-export --model $(DEMO_MODEL) --target onnx --out out/demo-onnx
	$(VENV)/bin/moe-run --engine-dir out/demo-onnx --image $(DEMO_IMAGE) --prompt "$(DEMO_PROMPT)"
	$(VENV)/bin/moe-run --model $(DEMO_MODEL) --image $(DEMO_IMAGE) --prompt "$(DEMO_PROMPT)"

test: install
	$(PY) -m pytest -q

# The GPU verification run (not part of `make test`): kernel sweep, plugin life cycle under compute-sanitizer,
# CUDA helpers, MoE-layer timing; writes docs/gpu-check/<date>-<device>.md|.json (GPU_CHECK_ARGS="--out DIR
# --only kernels,..."). Uses the venv when there is one, else python3 (a GPU machine with its own torch).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build out *.egg-info
