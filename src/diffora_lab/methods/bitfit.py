"""``method=bitfit``: only the biases and the classifier head train (Ben Zaken et al., 2022)."""

from __future__ import annotations

from diffora_lab.methods.full import Full, is_head
from diffora_lab.methods.registry import register_method


@register_method
class BitFit(Full):
    """BitFit: biases and the head; scored from its checkpoint like ``full``."""

    name = "bitfit"

    def trains(self, param_name: str, head_modules: list[str]) -> bool:
        return is_head(param_name, head_modules) or param_name.endswith(".bias")
