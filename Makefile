VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/moe-run --model demo --image tests/assets/demo.png --prompt "What is in the image?"

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
