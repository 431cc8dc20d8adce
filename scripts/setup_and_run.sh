#!/usr/bin/env bash
# Installs diffora_lab (torch 2.13.0 first, never upgraded) and runs the default job offline:
# MiniLM-L6 on the synthetic task, search -> discretization -> fine-tuning.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e .
python3 -m diffora_lab "$@"
