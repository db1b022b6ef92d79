# octft: the two commands a new user runs are `make demo` and `make test`.
# Both install first (uv, the locked environment in .venv), so a fresh clone needs nothing else.
# Bytecode is compiled at install: every octft command, trial runner and worker then starts without
# compiling torch, MLflow and Optuna from source (seconds per process; every time where
# PYTHONDONTWRITEBYTECODE is set, as on some CI machines).

UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
export PJRT_DEVICE ?= CPU
export CPU_NUM_DEVICES ?= 4

.PHONY: install install-tpu install-cpu browser demo test test-fast bench clean

# On a TPU VM: `make install TPU=1` (or `make install-tpu`) adds the locked `tpu` extra (libtpu, tpu-info).
# The choice is remembered in $(TPU_MARKER), because `uv sync` removes whatever it is not asked for: a
# later plain `make install` keeps libtpu. `make install-cpu` forgets the choice and removes libtpu.
TPU_MARKER := .octft-tpu
ifneq ($(wildcard $(VENV)/lib/python*/site-packages/libtpu),)
# A TPU environment installed before the marker existed (or by hand): keep it a TPU environment.
TPU_FOUND := 1
endif
UV_EXTRAS = $(if $(or $(wildcard $(TPU_MARKER)),$(TPU_FOUND)),--extra tpu)

install:
ifneq ($(TPU),)
	@touch $(TPU_MARKER)
else ifneq ($(TPU_FOUND),)
	@test -f $(TPU_MARKER) || { echo "libtpu found in $(VENV): keeping the TPU install (make install-cpu removes it)"; touch $(TPU_MARKER); }
endif
	@$(MAKE) --no-print-directory $(VENV)/.installed

install-tpu:
	@$(MAKE) --no-print-directory install TPU=1

install-cpu:
	rm -f $(TPU_MARKER) $(VENV)/.installed
	@test -x "$(UV)" || python3 -m pip install --quiet --user uv
	$(UV) sync --frozen --compile-bytecode

$(VENV)/.installed: pyproject.toml uv.lock $(wildcard $(TPU_MARKER))
	@test -x "$(UV)" || python3 -m pip install --quiet --user uv
	$(UV) sync --frozen --compile-bytecode $(UV_EXTRAS)
	@touch $@

# The study report's test opens the HTML in Debian's Chromium; install it once where we may (root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null); } \
		|| echo "chromium is not installed and cannot be installed here: the report's browser test will skip"

demo: install
	$(VENV)/bin/octft demo

# The suite on both cores of a 2-core machine (pytest-xdist; one test file per worker at a time, so a file's
# module fixtures are made once). TEST_WORKERS=1 runs it in one process.
TEST_WORKERS ?= 2
test: install browser
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "not integration"

bench: install
	$(PY) benchmarks/bench_audit.py
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf demo runs .pytest_cache
