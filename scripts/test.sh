#!/usr/bin/env bash
# The project's test command: fresh virtual environment, install, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv-test dev
.venv-test/bin/ruff check .
.venv-test/bin/mypy laplace_hub
.venv-test/bin/lint-imports
.venv-test/bin/python -m pytest -q "$@"
