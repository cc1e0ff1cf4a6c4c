VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_IMAGE := moe_llava/assets/demo/example.png
DEMO_PROMPT := Is there a circle in the image?

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded demo model: export to ONNX (validated against PyTorch), answer with the
# torch-free runtime, then the same question through PyTorch for comparison.
demo: install
	$(VENV)/bin/moe-export --model demo --target onnx --out out/demo-onnx
	$(VENV)/bin/moe-run --engine-dir out/demo-onnx --image $(DEMO_IMAGE) --prompt "$(DEMO_PROMPT)"
	$(VENV)/bin/moe-run --model demo --image $(DEMO_IMAGE) --prompt "$(DEMO_PROMPT)"

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build out *.egg-info
