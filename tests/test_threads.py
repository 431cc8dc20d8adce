"""The app sets the OpenMP wait policy and thread count before torch loads, unless the user did."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from diffora_lab.runtime import configure_threads

PROBE = (
    "import json, os, sys\n"
    "import diffora_lab.__main__\n"
    "torch_before = 'torch' in sys.modules\n"
    "import torch\n"
    "print(json.dumps({'torch_before': torch_before, 'policy': os.environ.get('OMP_WAIT_POLICY'),"
    " 'threads': torch.get_num_threads()}))\n"
)


def probe(**env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_entry_point_sets_passive_waiting_and_the_allowed_cores():
    seen = probe()
    assert seen["torch_before"] is False  # the settings can still take effect
    assert seen["policy"] == "PASSIVE"
    assert seen["threads"] == len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_what_the_user_set_is_kept():
    seen = probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert (seen["policy"], seen["threads"]) == ("ACTIVE", 1)


def test_configure_threads_reports_what_it_set():
    environ = {"OMP_NUM_THREADS": "3"}
    applied = configure_threads(environ)
    assert applied == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environ == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
