# SPDX-License-Identifier: AGPL-3.0-or-later
# The two commands of the quick start. Both set everything up first (idempotent, cached): see scripts/setup.sh.
.PHONY: setup demo test lint bench clean

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@.venv/bin/sharedllm demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) bench/bench_mesh.py --markdown

clean:
	rm -rf .venv .pytest_cache .ruff_cache *.egg-info
