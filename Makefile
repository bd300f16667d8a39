# Two commands do all the set-up: `make run` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIPELINE ?= pipelines/quickstart.yaml

.PHONY: run test lint bench clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# DeepSpeed compiles its CPU collective op (shared-memory all-reduce) the first time a process
# group starts: ~45 s on 2 cores, which would otherwise land in the first stage of the first run.
# Built here once, into this venv's own extension cache (torch's default is one per user, which
# another checkout's venv would rebuild with its own paths); on a GPU machine there is nothing to
# build. With the venv's own ninja, as the training workers build it: a system ninja of another
# version reads the build log as stale and builds the op again.
OPS_ENV = PATH="$(abspath $(BIN)):$$PATH" TORCH_EXTENSIONS_DIR="$(abspath $(VENV))/torch_extensions"
BUILD_OPS = $(OPS_ENV) $(BIN)/python -c \
	"from deepspeed.comm.torch import build_shm_op; build_shm_op()" 2>&1 | grep -E "built|rror" || true

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BUILD_OPS)
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	$(BUILD_OPS)
	touch $(VENV)/.installed $@

# `make run` again: RESUME=1 continues the run in runs/<pipeline>, `make clean` starts afresh.
WORKDIR = runs/$(basename $(notdir $(PIPELINE)))

run: $(VENV)/.installed
	@if [ -f $(WORKDIR)/state.json ] && [ -z "$(RESUME)" ]; then \
	  echo "$(WORKDIR) holds an earlier run of $(PIPELINE): 'make run RESUME=1' continues it, 'make clean' removes runs/ to start afresh"; \
	  exit 2; fi
	$(BIN)/allinone run $(PIPELINE) --workdir $(WORKDIR) $(if $(RESUME),--resume)

# The report test renders a page in a real headless browser: Debian's chromium, installed here
# where this user may (root with apt-get), otherwise named in one line before anything runs.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } || \
	{ echo "make test needs chromium for tests/test_report.py: run 'sudo apt-get install chromium' (Debian/Ubuntu) and retry"; exit 1; }

test: $(VENV)/.installed-test chromium
	$(BIN)/ruff check platform tests benchmarks
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check platform tests benchmarks

# Every run's work folder, its tracking store and registry included, and what the README's
# commands write (restored/, report.html).
clean:
	rm -rf runs restored report.html .pytest_cache
