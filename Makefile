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

bench:
	uv run python benchmarks/discovery.py

# Regenerate the example's golden endpoint.lock after an intended change.
golden:
	uv run gen-worker discover --project examples/hello-world > tests/golden/hello-world.endpoint.lock
