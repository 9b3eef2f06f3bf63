#!/usr/bin/env bash
# Creates .venv in the repo with the pinned CPU stack, or reuses it when already complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
stamp=".venv/.shark-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
build_kernels() {  # our C++ ops, cached in .venv by a hash of their sources (a no-op when built)
  .venv/bin/python -c "from shark_torchrec.kernels import build; build()"
}
if [ -f "$stamp" ]; then
  build_kernels
  exit 0
fi
echo "setting up .venv (about a minute)..." >&2
rm -rf .venv
"$PY" -m venv .venv
pip_install() {  # quiet, minus this machine's notes about absent local package mirrors
  .venv/bin/pip install -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}
pip_install --upgrade pip
# torch 2.13.0 resolves to the CPU build on this kind of machine; fbgemm-gpu-cpu pairs with it.
pip_install torch==2.13.0 fbgemm-gpu-cpu==1.8.0 torchx==0.7.0 numpy pytest \
  tensordict torchmetrics pyre-extensions iopath tqdm tyro tomli-w matplotlib ruff==0.17.6 \
  pytest-xdist==3.8.0 triton==3.6.0  # triton: our CUDA kernels (the tests run them on CPU, interpreted)
# torchrec's metadata asks for the CUDA fbgemm-gpu (2.7 GB) which would replace fbgemm-gpu-cpu.
pip_install --no-deps torchrec==1.8.0
pip_install --no-deps -e .
touch "$stamp"
build_kernels
