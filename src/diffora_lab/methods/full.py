"""``method=full``: every parameter of the backbone and the head trains (no adapters)."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from diffora_lab.backbones import Candidate
from diffora_lab.methods.registry import Built, Method, register_method


def is_head(param_name: str, head_modules: list[str]) -> bool:
    """Whether a parameter belongs to the classifier head (``backbone.head_modules``)."""
    return any(param_name.startswith(h) or f".{h}." in param_name for h in head_modules)


@register_method
class Full(Method):
    """Full fine-tuning: the reference a PEFT method tries to reach; scored from its checkpoint."""

    name = "full"

    def trains(self, param_name: str, head_modules: list[str]) -> bool:
        """Whether the parameter ``param_name`` trains."""
        return True

    def build(self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
        heads = list(cfg.backbone.head_modules)
        for param_name, param in backbone.named_parameters():
            param.requires_grad_(self.trains(param_name, heads))
        return Built(backbone, None, None)
