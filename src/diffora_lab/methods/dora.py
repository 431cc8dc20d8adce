"""``method=dora``: peft's DoRA (Liu et al., ICML 2024) on every candidate module, no search.

DoRA splits each adapted weight into a magnitude vector and a direction; the direction gets the
LoRA update, ``W' = m * (W + s B A) / ||W + s B A||``. In peft it is LoRA with
``use_dora=True``, so it attaches, counts (``lora_magnitude_vector`` is adapter), matches (the
reference rank) and exports (a peft adapter folder) exactly like ``lora``.
"""

from __future__ import annotations

from typing import Any

from diffora_lab.methods.lora import Lora
from diffora_lab.methods.registry import register_method


@register_method
class Dora(Lora):
    """Weight-decomposed LoRA on all candidates, at the run's rank."""

    name = "dora"

    def peft_options(self) -> dict[str, Any]:
        return {"use_dora": True}
