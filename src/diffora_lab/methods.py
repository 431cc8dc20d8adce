"""Methods: what each method (``method=``) adds to the backbone and which parameters it trains.

All methods share the harness (data, schedule, step budget, logging, ``results.json``); they differ
only in the model they hand to :class:`~diffora_lab.module.DiffoRAModule`:

- ``diffora``: LoRA on every candidate, gated by a DAM that is searched, then discretized.
- ``lora``: LoRA on every candidate, no gates.
- ``random_mask``: LoRA on a seeded random choice of k candidates (DiffoRA's k and rank).
- ``full``: every parameter trains. ``bitfit``: biases and the head train.
- ``dam.mask_path=FILE`` (with ``method=diffora``): LoRA on a saved mask's modules, no search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from diffora_lab.adapters import apply_mask, attach_lora, lora_alpha_for
from diffora_lab.backbones import Candidate
from diffora_lab.dam import DAM, Mask, num_kept


@dataclass
class Built:
    """A method's model and the DAM objects that come with it."""

    model: nn.Module
    dam: DAM | None
    mask: Mask | None


def _layer_grid(candidates: list[Candidate], module_types: list[str]) -> tuple[int, int]:
    return len({c.layer for c in candidates}), len(module_types)


def random_mask(
    candidates: list[Candidate], module_types: list[str], budget: float, seed: int, backbone: str
) -> Mask:
    """k = max(1, round(budget * n)) candidates drawn uniformly at random (seeded)."""
    scores = torch.rand(len(candidates), generator=torch.Generator().manual_seed(seed))
    mask = Mask.from_scores(
        scores.view(_layer_grid(candidates, module_types)),
        [c.name for c in candidates],
        module_types,
        budget,
        step=0,
        backbone=backbone,
        source="random",
    )
    return mask


def check_mask_fits(mask: Mask, candidates: list[Candidate], backbone: str, path: str) -> None:
    names = [c.name for c in candidates]
    if mask.modules != names:
        raise ValueError(
            f"dam.mask_path={path!r} was made for backbone {mask.backbone!r} with "
            f"{len(mask.modules)} candidate modules; this run's backbone {backbone!r} has "
            f"{len(names)} with other names. Use a mask from a run on the same backbone."
        )


def build(cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
    """Applies the configured method to a freshly loaded backbone."""
    name = cfg.method.name
    module_types = list(cfg.backbone.module_types)
    if name in ("full", "bitfit"):
        for param_name, param in backbone.named_parameters():
            is_head = any(
                param_name.startswith(h) or f".{h}." in param_name
                for h in cfg.backbone.head_modules
            )
            param.requires_grad_(name == "full" or is_head or param_name.endswith(".bias"))
        return Built(backbone, None, None)
    if name == "adalora":
        from diffora_lab.adalora import attach_adalora

        return Built(attach_adalora(cfg, backbone, candidates), None, None)

    lora_alpha, use_rslora = lora_alpha_for(
        str(cfg.method.get("scaling", "alpha")),
        int(cfg.rank),
        float(cfg.method.get("scale", 2.0)),
        float(cfg.method.lora_alpha),
    )
    model = attach_lora(
        backbone,
        candidates,
        rank=int(cfg.rank),
        lora_alpha=lora_alpha,
        lora_dropout=float(cfg.method.lora_dropout),
        head_modules=list(cfg.backbone.head_modules),
        use_rslora=use_rslora,
    )
    n = len(candidates)
    if name == "lora":
        mask = Mask.from_scores(
            torch.ones(_layer_grid(candidates, module_types)),
            [c.name for c in candidates],
            module_types,
            1.0,
            step=0,
            backbone=cfg.backbone.name,
            source="all",
        )
        return Built(model, None, mask)
    if name == "random_mask":
        num_kept(float(cfg.budget), n)
        mask = random_mask(
            candidates, module_types, float(cfg.budget), int(cfg.seed), cfg.backbone.name
        )
        apply_mask(model, candidates, mask.kept)
        return Built(model, None, mask)
    # diffora
    if cfg.dam.get("mask_path"):
        mask = Mask.load(cfg.dam.mask_path)
        check_mask_fits(mask, candidates, cfg.backbone.name, str(cfg.dam.mask_path))
        mask.source = "file"
        apply_mask(model, candidates, mask.kept)
        return Built(model, None, mask)
    layers, types = _layer_grid(candidates, module_types)
    dam = DAM(
        layers,
        module_types,
        relaxation=str(cfg.dam.relaxation),
        init=float(cfg.dam.init),
        k=num_kept(float(cfg.budget), n),
    )
    return Built(model, dam, None)
