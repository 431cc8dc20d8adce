#!/usr/bin/env bash
# Installs diffora_lab with its dev tools (torch 2.13.0 first, never upgraded) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[dev]"
python3 -m ruff check src tests bench
python3 -m pytest -q "$@"
