"""Every random generator's state, for checkpoints: a resumed run draws what the original would.

Plain Python values where possible, because Lightning loads checkpoints with ``weights_only=True``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The states of torch (CPU and CUDA), numpy and Python's ``random``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Puts back what :func:`rng_state` captured."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(
        tuple(rng["numpy"][:1])
        + (np.array(rng["numpy"][1], dtype=np.uint32),)
        + tuple(rng["numpy"][2:])
    )
    random.setstate(rng["python"])
