# octft: the two commands a new user runs are `make demo` and `make test`.
# Both install first (uv, the locked environment in .venv), so a fresh clone needs nothing else.

UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
export PJRT_DEVICE ?= CPU
export CPU_NUM_DEVICES ?= 4

.PHONY: install browser demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml uv.lock
	@test -x "$(UV)" || python3 -m pip install --quiet --user uv
	$(UV) sync --frozen
	@touch $@

# The study report's test opens the HTML in Debian's Chromium; install it once where we may (root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null); } \
		|| echo "chromium is not installed and cannot be installed here: the report's browser test will skip"

demo: install
	$(VENV)/bin/octft demo

test: install browser
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not integration"

bench: install
	$(PY) benchmarks/bench_audit.py
	$(PY) benchmarks/bench_cache.py

clean:
	rm -rf demo runs .pytest_cache
