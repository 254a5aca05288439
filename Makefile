# pix2pix_nb: every target installs what it needs into .venv first, so a fresh clone needs only `make demo` / `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real CMP facades for development and CI: the project's data-location setting (read by pix2pix_nb.data.find_facades)
# points at ../shared/data when this checkout sits next to one; users set it themselves or run get_facades().
ifneq ($(wildcard ../shared/data/facades/train),)
export PIX2PIX_DATA ?= $(abspath ../shared/data)
endif

.PHONY: help install demo showcase test test-fast test-slow export check-export check-clean nbtest pytest readme clean-nbs bench docs-preview

help:
	@echo "make demo        - set up .venv and run the demo (writes runs/demo/)"
	@echo "make test        - set up .venv, check exports/notebooks are clean, nbdev_test, pytest"
	@echo "make test-slow   - also run cells flagged #| slow and tests marked slow"
	@echo "make readme      - regenerate README.md from nbs/index.ipynb"
	@echo "make showcase    - train the real-facades CPU recipe (~45 min alone on 2 cores), write nbs/images/showcase_*"
	@echo "make bench       - run benchmarks/ and rewrite BENCHMARKS.md"
	@echo "make docs-preview- render the docs locally to _docs_preview/ and browser-test them"

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pix2pix_demo --out runs/demo

# The real-facades showcase: the `facades-cpu` recipe on label sketches of the CMP facades, the L1-alone baseline,
# held-out metrics and the sheets shown in chapter 03c and the README. Needs PIX2PIX_DATA (set above when
# ../shared/data exists) or a get_facades() download. Run it alone: its wall times are part of the result.
showcase: $(STAMP)
	$(BIN)/python tools/showcase.py --out runs/showcase --images nbs/images

# The library must be exactly what the notebooks export, and notebooks must be stored clean.
check-export: $(STAMP)
	$(BIN)/python tools/unchanged.py pix2pix_nb -- $(BIN)/nbdev_export

check-clean: $(STAMP)
	$(BIN)/python tools/unchanged.py nbs -- $(BIN)/nbdev_clean

# Two notebooks at a time, one torch thread each (two 2-thread workers on 2 cores thrash: 15x slower).
nbtest: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --timing

pytest: $(STAMP)
	$(BIN)/python -m pytest -q tests

test: check-export check-clean nbtest pytest
	$(BIN)/python tools/readme.py --check

test-slow: $(STAMP)
	$(BIN)/nbdev_test --n_workers 1 --flags slow --timing
	$(BIN)/python -m pytest -q tests --runslow

# clean first: nbdev_clean settles the cell ids that nbdev_export writes into the modules
export: $(STAMP)
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export

readme: $(STAMP)
	$(BIN)/python tools/readme.py

# Render the docs locally and test them in headless Chromium (not part of `make test`: it installs
# Debian's chromium, chromium-driver and libjs-mathjax on first use). See tools/docs_preview.py.
CHROMIUM_PKGS := chromium chromium-driver libjs-mathjax
docs-preview: $(STAMP) docs-chromium
	$(BIN)/python tools/docs_preview.py

# Re-run only the browser test on the pages already rendered in _docs_preview/.
.PHONY: docs-browser-test docs-chromium
docs-browser-test: docs-chromium
	$(BIN)/python tools/docs_preview.py --browser-only

docs-chromium:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || [ ! -f /usr/share/javascript/mathjax/MathJax.js ]; then \
	  echo "installing $(CHROMIUM_PKGS) with apt (Debian packages)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(CHROMIUM_PKGS) >/dev/null; \
	fi

# Benchmarks (~5-10 min on 2 CPU cores; not part of `make test`): rewrites the generated section of BENCHMARKS.md and
# benchmarks/results.json. BENCH_ARGS=--quick for fewer repeats, BENCH_ARGS="--device cuda" on a GPU machine.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/perf.py $(PERF_ARGS)
	$(BIN)/python benchmarks/infer.py $(INFER_ARGS)

# Real-browser tests (tests/browser/, not part of `make test`): the sketch studio's web app and its Jupyter widget, and
# chapter 03's epoch-grid slider inside a real JupyterLab server, in headless Chromium driven by Selenium. Installs the
# [browser] extra and Debian's chromium + chromium-driver (as docs-preview does); the tests skip, saying why, only when
# no browser could be installed. Screenshots: tests/browser/_shots/. CI runs this after `make test` (.ci/run).
BROWSER_STAMP := $(VENV)/.installed-browser
$(BROWSER_STAMP): $(STAMP) settings.ini setup.py
	$(BIN)/python -m pip install -q -e ".[dev,browser]"
	touch $(BROWSER_STAMP)

.PHONY: test-browser browser-chromium
browser-chromium:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing chromium chromium-driver with apt (Debian packages)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	    || echo "could not install chromium: the browser tests will skip"; \
	fi

test-browser: $(BROWSER_STAMP) browser-chromium
	PIX2PIX_BROWSER_TESTS=1 $(BIN)/python -m pytest -q -rs -s tests/browser
