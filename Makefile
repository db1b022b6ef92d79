# octft: the two commands a new user runs are `make demo` and `make test`.
# Both install first (uv, the locked environment in .venv), so a fresh clone needs nothing else.

UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
export PJRT_DEVICE ?= CPU
export CPU_NUM_DEVICES ?= 4

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml uv.lock
	@test -x "$(UV)" || python3 -m pip install --quiet --user uv
	$(UV) sync --frozen
	@touch $@

demo: install
	$(VENV)/bin/octft demo

test: install
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not integration"

bench: install
	$(PY) benchmarks/bench_audit.py
	$(PY) benchmarks/bench_cache.py

clean:
	rm -rf demo runs .pytest_cache
