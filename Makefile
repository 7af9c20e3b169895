# One entry per task; `make check` is what CI (.ci/run) runs.
.PHONY: check test lint format typecheck imports bench golden

check:
	bash .ci/run

test:
	uv run pytest

lint:
	uv run ruff check .
	uv run ruff format --check .

format:
	uv run ruff format .
	uv run ruff check --fix .

typecheck:
	uv run mypy

imports:
	uv run lint-imports

# Every benchmark in benchmarks/, each printing its ratio against its floor (minutes in all).
bench:
	uv run python benchmarks/discovery.py
	uv run python benchmarks/dev_runner.py
	uv run python benchmarks/worker_roundtrip.py
	uv run python benchmarks/worker_streaming.py
	uv run python benchmarks/worker_cold_start.py
	uv run python benchmarks/model_pull.py
	@if uv run python -c "import torch, diffusers, transformers" 2>/dev/null; then \
		uv run python benchmarks/model_load.py; \
	else \
		echo "benchmarks/model_load.py skipped: it needs the torch extra (see README)"; \
	fi

# Regenerate the example's golden endpoint.lock after an intended change.
golden:
	uv run gen-worker discover --project examples/hello-world > tests/golden/hello-world.endpoint.lock
