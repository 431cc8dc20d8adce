"""LoRA adapters on the candidate modules: gating during the search, masking after it.

peft provides the LoRA layers (``lora_A``, ``lora_B``, ``scaling``); this module adds the DAM gate
to each of them and later turns a gated model into a plain peft LoRA model on the kept modules.

While searching, module i computes ``W_i x + gamma_i * s * B_i A_i x`` (METHOD.md, "Objects");
:class:`LoraGates` puts the gate into peft's LoRA scaling ``s`` for weight steps (no extra
operation) and onto the rank-r ``lora_A`` output for architecture steps (little extra memory).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from diffora_lab.backbones import Candidate

ADAPTER = "default"


SCALINGS = ("constant", "rslora", "alpha")


def lora_alpha_for(scaling: str, rank: int, scale: float, lora_alpha: float) -> tuple[float, bool]:
    """``(lora_alpha, use_rslora)`` for peft so that the LoRA update scale follows ``scaling``.

    peft multiplies B A x by s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA). A fixed
    lora_alpha therefore halves the update scale each time the rank doubles, which confounds any
    comparison across ranks (DiffoRA at r=16 against LoRA at r=8). The rules:

    - ``constant`` (default): lora_alpha = scale * r, so s = ``scale`` at every rank (2.0 equals
      the common LoRA r=8, lora_alpha=16 recipe);
    - ``rslora``: s = lora_alpha / sqrt(r) (Kalajdzievski 2023, rank-stabilised LoRA);
    - ``alpha``: s = lora_alpha / r, peft's default (the harness's behaviour before this option).
    """
    if scaling == "constant":
        return float(scale) * rank, False
    if scaling == "rslora":
        return float(lora_alpha), True
    if scaling == "alpha":
        return float(lora_alpha), False
    raise ValueError(f"method.scaling={scaling!r}: choose one of {list(SCALINGS)}.")


def peft_task_type(model: nn.Module) -> str:
    """peft's ``task_type`` for a transformers model: ``CAUSAL_LM`` for a causal LM (the
    ``choice`` task kind loads one), else ``SEQ_CLS`` (a sequence classifier)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return "CAUSAL_LM" if type(model).__name__ in names else "SEQ_CLS"


def attach_lora(
    model: nn.Module,
    candidates: list[Candidate],
    rank: int,
    lora_alpha: float,
    lora_dropout: float,
    head_modules: list[str],
    task_type: str | None = None,
    **peft_options: Any,
) -> PeftModel:
    """Wraps ``model`` with peft LoRA adapters on exactly the given candidate modules.

    The backbone is frozen by peft; the classifier head (``head_modules``, none for a causal LM
    whose tied ``lm_head`` stays frozen) stays trainable and is saved with the adapter
    (``modules_to_save``). ``task_type`` defaults to :func:`peft_task_type` of the model.
    ``peft_options`` are further ``LoraConfig`` fields (a peft variant of LoRA, e.g.
    ``use_dora=True``).
    """
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1 (the LoRA rank r).")
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=[c.name for c in candidates],
        modules_to_save=list(head_modules) or None,
        task_type=task_type or peft_task_type(model),
        **peft_options,
    )
    return get_peft_model(model, config)


def base_of(peft_model: PeftModel) -> nn.Module:
    """The wrapped transformers model (module names there are the candidates' full paths)."""
    return peft_model.base_model.model


def lora_layer(peft_model: PeftModel, name: str) -> LoraLayer:
    layer = base_of(peft_model).get_submodule(name)
    if not isinstance(layer, LoraLayer):
        raise KeyError(f"{name} carries no LoRA adapter")
    return layer


class _GatesNotSet:
    """Stands in for a LoRA scaling until :meth:`LoraGates.set` puts the gated one there."""

    def __mul__(self, other):
        raise RuntimeError("LoraGates.set() must be called before the forward pass")

    __rmul__ = __mul__


class LoraGates:
    """Multiplies each candidate's LoRA branch by its DAM gate: ``W x + gamma_i s B A x``.

    peft computes a branch as ``lora_B(lora_A(dropout(x))) * layer.scaling[adapter]``. The gate
    enters that product in one of two places, whichever the step needs (same function):

    * detached gates (weight steps, validation): the float ``s`` is replaced by the 0-dim tensor
      ``gamma_i * s``, so gating adds no operation to a plain LoRA forward;
    * gates with ``requires_grad`` (architecture steps): a forward hook multiplies the rank-r
      output of ``lora_A``, so what autograd keeps for the gate gradient is r features per token
      (gating peft's d_out-wide product would keep the whole branch output).

    Call :meth:`set` before every forward; :meth:`remove` gives peft its float scalings back.
    """

    def __init__(self, peft_model: PeftModel, candidates: list[Candidate]) -> None:
        self._layers = [lora_layer(peft_model, c.name) for c in candidates]
        self._scales = [float(layer.scaling[ADAPTER]) for layer in self._layers]
        self._scale_vector: torch.Tensor | None = None
        self._grad_gates: torch.Tensor | None = None  # gates with grad, for the hooks
        self._handles = [
            layer.lora_A[ADAPTER].register_forward_hook(self._hook(index))
            for index, layer in enumerate(self._layers)
        ]
        for layer in self._layers:
            layer.scaling[ADAPTER] = _GatesNotSet()

    def _hook(self, index: int):
        def scale(_module, _inputs, output):
            if self._grad_gates is None:
                return None  # the gate is in the scaling
            if self._grad_gates.dtype != output.dtype:  # cast once for all (bf16 under autocast)
                self._grad_gates = self._grad_gates.to(output.dtype)
            return output * self._grad_gates[index]

        return scale

    def set(self, gates: torch.Tensor) -> None:
        flat = gates.reshape(-1)
        if len(flat) != len(self._layers):
            raise ValueError(f"{len(flat)} gates for {len(self._layers)} gated modules")
        if flat.requires_grad:
            self._grad_gates = flat
            for layer, scale in zip(self._layers, self._scales):
                layer.scaling[ADAPTER] = scale
            return
        self._grad_gates = None
        vector = self._scale_vector
        if vector is None or vector.device != flat.device or vector.dtype != flat.dtype:
            vector = torch.tensor(self._scales, dtype=flat.dtype, device=flat.device)
            self._scale_vector = vector
        scaled = flat * vector
        for index, layer in enumerate(self._layers):
            layer.scaling[ADAPTER] = scaled[index]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer, scale in zip(self._layers, self._scales):
            layer.scaling[ADAPTER] = scale
        self._handles, self._layers, self._grad_gates = [], [], None
        self._scale_vector = None


def apply_mask(
    peft_model: PeftModel,
    candidates: list[Candidate],
    kept: list[bool],
    gates: torch.Tensor | None = None,
    *,
    fold_gates: bool = True,
    reinit: bool = False,
) -> None:
    """Turns the gated model into a plain LoRA model on the kept modules (METHOD.md, Phase 2).

    Dropped modules get their original ``nn.Linear`` back: no LoRA compute, no parameters, hence
    no optimizer state. Kept modules keep their search weights (weight sharing); with
    ``fold_gates`` their gate is folded into B (``B <- gamma B``) so each computes the same
    function just after as just before. ``reinit`` restarts kept adapters from the LoRA init
    instead (ablation).

    Args:
        peft_model: Model returned by :func:`attach_lora`.
        candidates: All candidate modules, in DAM order.
        kept: One flag per candidate.
        gates: Gate values (any shape with one entry per candidate); needed for folding.
        fold_gates: Fold gates into B.
        reinit: Re-initialise kept adapters.
    """
    if len(kept) != len(candidates):
        raise ValueError(f"mask has {len(kept)} entries for {len(candidates)} candidates")
    flat = None if gates is None else gates.detach().reshape(-1)
    base = base_of(peft_model)
    for index, (cand, keep) in enumerate(zip(candidates, kept)):
        layer = lora_layer(peft_model, cand.name)
        if not keep:
            parent_name, _, child = cand.name.rpartition(".")
            setattr(base.get_submodule(parent_name), child, layer.get_base_layer())
            continue
        if reinit:
            layer.reset_lora_parameters(ADAPTER, init_lora_weights=True)
        elif fold_gates and flat is not None:
            with torch.no_grad():
                weight = layer.lora_B[ADAPTER].weight
                weight.mul_(flat[index].to(weight.dtype))
    peft_model.peft_config[ADAPTER].target_modules = {
        c.name for c, keep in zip(candidates, kept) if keep
    }


def count_parameters(
    module: nn.Module, head_modules: tuple[str, ...] = ("classifier", "pooler")
) -> dict[str, int]:
    """Trainable parameters split into adapter (``lora_*``), head, backbone, and the total.

    ``backbone`` is non-zero only for methods that train backbone weights (full, bitfit).
    """
    counts = {"adapter": 0, "head": 0, "backbone": 0}
    heads = set(head_modules)
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            counts["adapter"] += param.numel()
        elif heads & set(parts):
            counts["head"] += param.numel()
        else:
            counts["backbone"] += param.numel()
    counts["total"] = sum(counts.values())
    return counts
