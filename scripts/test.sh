#!/usr/bin/env bash
# The project's test command: fresh virtual environment, install, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv-test dev
.venv-test/bin/ruff check .
.venv-test/bin/mypy laplace_hub
.venv-test/bin/lint-imports
# The documentation site (mkdocs.yml), strictly: a broken link or anchor, a missing cross-reference,
# a public name without a docstring or on no page fails it. Not --quiet: that hides the warnings
# --strict counts; the INFO lines are dropped instead.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv-test/bin/mkdocs build --strict --site-dir "$site" 2>&1 | { grep -v "^INFO" || true; }
# One torch thread per process unless told otherwise: on a shared 2-core machine two OpenMP
# threads wait on each other whenever one is descheduled (the shortened continual run took
# 148 s so, 46 s with one thread); subprocesses of the tests inherit it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Tests run on every core (pytest-xdist; worksteal evens out the few long end-to-end tests);
# PYTEST_WORKERS=0 runs them in this process. Arguments go to pytest:
# `bash scripts/test.sh -m "not slow"` skips the slow end-to-end tests.
.venv-test/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist worksteal "$@"
