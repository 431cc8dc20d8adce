"""``method=lora``: LoRA on every candidate module at one rank, no gates, no search.

:class:`Lora` is also the base of the other LoRA-type methods (DiffoRA, a random mask, DoRA):
they attach the same peft adapters (:meth:`Lora.attach`, with :meth:`Lora.peft_options` for
peft's own variants) and differ in which candidates keep them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from peft import PeftModel
from torch import nn

from diffora_lab.adapters import attach_lora, lora_alpha_for
from diffora_lab.backbones import Candidate
from diffora_lab.dam import Mask
from diffora_lab.methods.registry import Built, Method, register_method


def layer_grid(candidates: Sequence[Candidate], module_types: Sequence[str]) -> tuple[int, int]:
    """The DAM's shape for these candidates: (layers, module types)."""
    return len({c.layer for c in candidates}), len(module_types)


@register_method
class Lora(Method):
    """LoRA (Hu et al., 2022) on all n candidates; matched: the reference rank itself."""

    name = "lora"
    adapts_candidates = True
    exports_adapter = True

    def peft_options(self) -> dict[str, Any]:
        """Extra ``peft.LoraConfig`` fields of this variant (none for plain LoRA)."""
        return {}

    def attach(
        self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]
    ) -> PeftModel:
        """peft LoRA adapters on every candidate (rank ``cfg.rank``), the head trainable.

        The update scale follows ``method.scaling`` (:func:`~diffora_lab.adapters.lora_alpha_for`):
        by default s = ``method.scale`` at every rank, so methods at different ranks compare at
        the same scale.
        """
        lora_alpha, use_rslora = lora_alpha_for(
            str(cfg.method.get("scaling", "alpha")),
            int(cfg.rank),
            float(cfg.method.get("scale", 2.0)),
            float(cfg.method.lora_alpha),
        )
        return attach_lora(
            backbone,
            candidates,
            rank=int(cfg.rank),
            lora_alpha=lora_alpha,
            lora_dropout=float(cfg.method.lora_dropout),
            head_modules=list(cfg.backbone.head_modules),
            use_rslora=use_rslora,
            **self.peft_options(),
        )

    def matched_rank(self, rank, target_rank, candidates, budget, tolerance) -> int:
        return target_rank  # LoRA at the reference rank on all candidates is the reference

    def build(self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
        module_types = list(cfg.backbone.module_types)
        mask = Mask.from_scores(
            torch.ones(layer_grid(candidates, module_types)),
            [c.name for c in candidates],
            module_types,
            1.0,
            step=0,
            backbone=cfg.backbone.name,
            source="all",
        )
        return Built(self.attach(cfg, backbone, candidates), None, mask)
