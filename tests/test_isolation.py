"""The suite's own guard (conftest.process_state_restored) puts process-wide state back."""

from __future__ import annotations

import logging
import os

import torch
import torch._dynamo.config
import torch._inductor.config
from conftest import process_state_restored

from diffora_lab import architect


def test_the_guard_restores_what_a_test_changes(tmp_path):
    config = torch._inductor.config
    before = (
        dict(os.environ),
        os.getcwd(),
        torch.get_num_threads(),
        config.fallback_random,
        torch._dynamo.config.cache_size_limit,
        logging.getLogger("diffora_lab").level,
        architect.architect_names(),
    )

    class Added(architect.Architect):
        pass

    with process_state_restored():
        os.environ["DIFFORA_GUARD_TEST"] = "1"
        os.environ.pop("HF_HUB_OFFLINE")
        os.chdir(tmp_path)
        torch.set_num_threads(2)
        config.fallback_random = not config.fallback_random
        del config.fallback_random  # unittest.mock.patch deletes, then recreates
        torch._dynamo.config.cache_size_limit += 3
        logging.getLogger("diffora_lab").setLevel(logging.CRITICAL)
        architect.register_architect("guard_test")(Added)
        architect._ARCHITECTS["first"] = Added  # a replaced entry
    after = (
        dict(os.environ),
        os.getcwd(),
        torch.get_num_threads(),
        config.fallback_random,
        torch._dynamo.config.cache_size_limit,
        logging.getLogger("diffora_lab").level,
        architect.architect_names(),
    )
    assert after == before
    assert architect.get_architect("first") is architect.Architect
