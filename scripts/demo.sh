#!/usr/bin/env bash
# The project's main job: fresh virtual environment, install, run the end-to-end path.
# (Interim until `laplace-hub demo` lands: write an artifact, validate it, inspect it.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv-demo demo
out=$(mktemp -d)
.venv-demo/bin/python -c "
from laplace_hub import Artifact
Artifact.open('spec/conformance/valid/weight-kron-sharded').save('$out/artifact')"
.venv-demo/bin/laplace-hub validate "$out/artifact"
.venv-demo/bin/laplace-hub inspect "$out/artifact"
