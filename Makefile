# Every target creates .venv if it is missing. torch is installed first, pinned, so that pip takes the
# CPU build on this machine's disk instead of resolving a multi-GB CUDA build.
PY := .venv/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test bench torture lint clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[hf,data,plot,s3,dist,trl,dev]"
	touch $@

venv: .venv/.installed

demo: venv
	.venv/bin/savepoint demo

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks.run

torture: venv
	SAVEPOINT_TORTURE=full $(PY) -m pytest -q tests/reliability tests/distributed/test_reshard.py tests/distributed/test_two_nodes.py \
		tests/async_save/test_process_kill.py tests/core/test_memory_tier.py

lint: venv
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
	.venv/bin/mypy

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
