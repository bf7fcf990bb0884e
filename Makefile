# Both targets create or reuse the pinned environment in .venv (ci/env.sh) first.
.PHONY: demo test env lint format bench clean

demo:
	bash ci/demo.sh

test:
	bash ci/test.sh

env:
	bash ci/env.sh

lint: env
	.venv/bin/python -m ruff check bundles tests ci
	.venv/bin/python -m black --check bundles tests ci
	.venv/bin/python -m isort --check-only bundles tests ci
	.venv/bin/python -m flake8 bundles tests ci

format: env
	.venv/bin/python -m isort bundles tests ci
	.venv/bin/python -m black bundles tests ci

bench: env
	.venv/bin/python -m hybridseg bench

clean:
	rm -rf .venv .pytest_cache demo_output
