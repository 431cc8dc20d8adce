"""``method=diffora``: LoRA on every candidate, gated by a DAM that is searched, then discretized.

With ``dam.mask_path=FILE`` there is no search: LoRA on a saved mask's modules fine-tunes
directly. The search itself is the :class:`~diffora_lab.architect.Architect`'s; the
discretization is :class:`~diffora_lab.callbacks.Discretization`'s.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from diffora_lab.adapters import apply_mask
from diffora_lab.backbones import Candidate
from diffora_lab.dam import DAM, Mask
from diffora_lab.methods.lora import layer_grid
from diffora_lab.methods.random_mask import MaskedLora
from diffora_lab.methods.registry import Built, register_method
from diffora_lab.searches import search_for


def check_mask_fits(mask: Mask, candidates: list[Candidate], backbone: str, path: str) -> None:
    """Raises ``ValueError`` when a saved mask was made for other candidate modules."""
    names = [c.name for c in candidates]
    if mask.modules != names:
        raise ValueError(
            f"dam.mask_path={path!r} was made for backbone {mask.backbone!r} with "
            f"{len(mask.modules)} candidate modules; this run's backbone {backbone!r} has "
            f"{len(names)} with other names. Use a mask from a run on the same backbone."
        )


@register_method
class DiffoRA(MaskedLora):
    """DiffoRA (Jiang et al., 2025): the DAM search keeps the top-k candidates' adapters."""

    name = "diffora"
    searches = True

    def search_enabled(self, cfg: DictConfig) -> bool:
        return not cfg.dam.get("mask_path")

    def build(self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
        model = self.attach(cfg, backbone, candidates)
        if cfg.dam.get("mask_path"):
            mask = Mask.load(cfg.dam.mask_path)
            check_mask_fits(mask, candidates, cfg.backbone.name, str(cfg.dam.mask_path))
            mask.source = "file"
            apply_mask(model, candidates, mask.kept)
            return Built(model, None, mask)
        module_types = list(cfg.backbone.module_types)
        layers, _ = layer_grid(candidates, module_types)
        dam = DAM(
            layers,
            module_types,
            relaxation=search_for(cfg).relaxation,  # the search variant's (searches/)
            init=float(cfg.dam.init),
            k=self.budget(cfg, candidates).expected_count,  # the topk relaxation's sum
        )
        return Built(model, dam, None)
