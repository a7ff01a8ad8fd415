# machipc: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.machipc-installed
SOURCES := pyproject.toml setup.py $(wildcard machipc/*.pyx machipc/*.pxd)

.PHONY: install demo test test-pure bench bench-quick macos-check clean systemd-tools fuzz soak sanitize

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -U pip setuptools wheel 'Cython>=3.0'

# Editable install: builds the Cython extensions in place.
$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation -e '.[test]'
	$(VPY) -c 'import sys, importlib; importlib.import_module("machipc._mach" if sys.platform == "darwin" else "machipc._unix")' || { echo "machipc or its Cython extension does not import (the error is above)"; exit 1; }
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VPY) -m machipc demo

# The independent C client of docs/protocol.md (tests/test_conformance.py runs it).
# Without a compiler the conformance tests say so and skip it.
tests/c/bin/client: tests/c/client.c
	@if command -v $(CC) >/dev/null 2>&1; then mkdir -p tests/c/bin && $(CC) -O2 -Wall -Wextra -o $@ tests/c/client.c; \
	else echo "no C compiler ($(CC)): tests/c/client.c is not built, its conformance tests skip"; fi

test: install macos-check tests/c/bin/client
	$(VPY) -m pytest tests
	MACHIPC_PURE_PYTHON=1 $(VPY) -m pytest -q tests/test_backend.py

# Benchmarks (bench/README.md): extra deps, the C floor, pytest-benchmark, report.
BENCH_DEPS := $(VENV)/.bench-deps
BENCH_RUN  := $(VPY) -m pytest bench -p no:cacheprovider -q --timeout=1800 --benchmark-columns=median,rounds --benchmark-sort=name

$(BENCH_DEPS): $(VPY)
	$(VPY) -m pip install -q 'pytest-benchmark>=4' 'pyzmq>=25' 'matplotlib>=3.6'
	touch $(BENCH_DEPS)

bench/bin/c_floor: bench/c_floor.c
	mkdir -p bench/bin
	$(CC) -O2 -Wall -o $@ bench/c_floor.c

bench: install $(BENCH_DEPS) bench/bin/c_floor
	mkdir -p bench/results
	$(BENCH_RUN) --benchmark-json=bench/results/full.json
	$(VPY) bench/report.py bench/results/full.json

bench-quick: install $(BENCH_DEPS) bench/bin/c_floor
	mkdir -p bench/results
	$(BENCH_RUN) --quick --benchmark-json=bench/results/quick.json
	$(VPY) bench/report.py bench/results/quick.json

# Cross-compiles machipc/_mach.pyx for aarch64/x86_64 macOS with zig (tools/macos_check.py).
macos-check: $(VPY)
	@$(VPY) tools/macos_check.py || { rc=$$?; [ $$rc -eq 2 ] && echo "macos-check: SKIPPED: ziglang cannot be installed here"; [ $$rc -eq 2 ]; }

# Reliability (issue 8): long fuzz run, 1M-message soak, ASan build of the C transport.
FUZZ_SECONDS ?= 300
fuzz: install
	$(VPY) -m pip install -q atheris
	rm -rf .fuzz-corpus && cp -r fuzz/corpus .fuzz-corpus
	$(VPY) fuzz/fuzz_recv.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 .fuzz-corpus

soak: install
	MACHIPC_SOAK_MESSAGES=1000000 MACHIPC_SOAK_LARGE_MESSAGES=100000 $(VPY) -m pytest -q -s -p no:logging tests/test_soak.py

sanitize: install
	VPY=$(VPY) FUZZ_SECONDS=30 sh fuzz/sanitize.sh

clean:
	rm -rf .fuzz-corpus $(VENV) build dist *.egg-info machipc/*.so machipc/*.c .pytest_cache .benchmarks .macos-check bench/bin

# systemd-socket-activate, for tests/test_activation.py's end-to-end test (which is
# skipped with the reason when it is missing). Opt-in: the systemd package is heavy.
systemd-tools:
	@command -v systemd-socket-activate >/dev/null 2>&1 || test -x /usr/bin/systemd-socket-activate || \
	  { command -v apt-get >/dev/null 2>&1 && apt-get install -y --no-install-recommends systemd; } || \
	  echo "systemd-socket-activate is not available: the socket-activation end-to-end test will be skipped"
