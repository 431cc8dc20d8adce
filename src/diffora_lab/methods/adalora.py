"""The AdaLoRA baseline (``method=adalora``): peft's AdaLoRA on the same candidate modules.

AdaLoRA (Zhang et al., ICLR 2023) writes each adapter in SVD form, ``B diag(E) A``, starts every
module at rank ``init_r`` and prunes singular values by importance until the total rank is
``target_r`` per module on average. Here ``target_r`` is the run's ``rank`` (so ``method=adalora
rank=8`` is the AdaLoRA row next to LoRA r=8 in METHOD.md's reference table) and ``init_r =
round(init_ratio * target_r)`` (the paper's initial budget of 1.5x the final one).

What peft does and this harness relies on (peft 0.21, checked in its source):

- ``AdaLoraModel.forward`` adds ``orth_reg_weight * mean ||P^T P - I||_F`` to ``outputs.loss``
  whenever the model is called with labels, so the training loss of
  :class:`~diffora_lab.module.TrainingModule` includes the orthogonal regularizer with no change
  there; validation (no labels) is unaffected.
- ``update_and_allocate(step)`` must run after every optimizer step, before ``zero_grad`` (it
  reads the gradients): :meth:`AdaLora.after_weight_step` does, with the 0-based step.
  With ``tfinal >= 1`` it forces the final allocation at step ``total_step - tfinal`` (exactly
  the target budget, fewer on ties) and re-applies that rank pattern after every later step.
- ``save_pretrained`` writes only the kept singular triplets plus ``rank_pattern``;
  ``PeftModel.from_pretrained`` resizes the modules back, so the adapter folder is a normal
  peft export.

Resume: the allocator's importance averages and the rank pattern live outside the state dict;
:func:`allocator_state` / :func:`load_allocator_state` carry them through a checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch import nn

from diffora_lab.adapters import lora_alpha_for, peft_task_type
from diffora_lab.backbones import Candidate
from diffora_lab.budget import target_rank_of
from diffora_lab.methods.registry import Built, Method, register_method

ADAPTER = "default"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaLoraSchedule:
    """AdaLoRA's budget schedule in steps (peft's ``tinit``, ``tfinal``, ``deltaT``).

    Steps ``0..tinit`` keep the initial budget, steps up to ``total_step - tfinal`` shrink it
    cubically (one allocation every ``delta_t`` steps), the last ``tfinal`` steps train at the
    final budget with the rank pattern frozen.
    """

    total_step: int
    tinit: int
    tfinal: int
    delta_t: int


def schedule(
    total_step: int, tinit_ratio: float, tfinal_ratio: float, delta_t_ratio: float
) -> AdaLoraSchedule:
    """Turns the schedule's fractions of the step budget into steps.

    ``tfinal`` and ``delta_t`` are at least 1: with ``tfinal = 0`` peft never reaches its final
    allocation (the budget would stay above target at the last step).

    Raises:
        ValueError: A fraction outside its range, or no steps left for the pruning phase.
    """
    for key, value in (("tinit_ratio", tinit_ratio), ("tfinal_ratio", tfinal_ratio)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"method.{key}={value}: a share of train.max_steps in [0, 1).")
    if not 0.0 <= delta_t_ratio < 1.0:
        raise ValueError(f"method.delta_t_ratio={delta_t_ratio}: a share of steps in [0, 1).")
    tinit = round(tinit_ratio * total_step)
    tfinal = max(1, round(tfinal_ratio * total_step))
    delta_t = max(1, round(delta_t_ratio * total_step))
    if tinit >= total_step - tfinal:
        raise ValueError(
            f"method.tinit_ratio={tinit_ratio} and method.tfinal_ratio={tfinal_ratio} leave no "
            f"pruning phase in train.max_steps={total_step} (tinit={tinit}, tfinal={tfinal}): "
            "lower them (their sum must stay below 1) or train for more steps."
        )
    return AdaLoraSchedule(total_step, tinit, tfinal, delta_t)


def initial_rank(init_ratio: float, target_r: int) -> int:
    """``init_r = round(init_ratio * target_r)``: the rank every module starts at.

    Raises:
        ValueError: ``init_r`` not above ``target_r``: nothing to prune, and peft's allocator
            fails at its first allocation (``kthvalue`` with k = 0).
    """
    init_r = math.floor(init_ratio * target_r + 0.5)
    if init_r <= target_r:
        raise ValueError(
            f"method.init_ratio={init_ratio}: the initial rank round({init_ratio} x {target_r}) "
            f"= {init_r} must exceed the target rank {target_r} (AdaLoRA prunes from one to the "
            "other; peft fails with nothing to prune): use e.g. method.init_ratio=1.5, or "
            "method=lora for one fixed rank."
        )
    return init_r


def adalora_config(
    cfg: DictConfig, candidates: list[Candidate], task_type: str = "SEQ_CLS"
) -> AdaLoraConfig:
    """The peft ``AdaLoraConfig`` of a run: full candidate paths, budget from ``rank``.

    ``task_type`` is peft's for the backbone (:func:`~diffora_lab.adapters.peft_task_type`);
    the head (``backbone.head_modules``, none for a causal LM) trains and is saved, as in LoRA.
    """
    method = cfg.method
    target_r = int(cfg.rank)
    if target_r < 1:
        raise ValueError(f"rank={target_r}: AdaLoRA's target rank must be >= 1.")
    init_r = initial_rank(float(method.get("init_ratio", 1.5)), target_r)
    steps = schedule(
        int(cfg.train.max_steps),
        float(method.tinit_ratio),
        float(method.tfinal_ratio),
        float(method.delta_t_ratio),
    )
    # AdaLoRA scales by lora_alpha / init_r (peft divides by the initial rank): the harness's
    # scaling rule applies to that rank, as LoRA's applies to r.
    scaling = str(method.get("scaling", "alpha"))
    if scaling == "rslora":
        raise ValueError("method.scaling=rslora: not available for adalora; use constant or alpha.")
    lora_alpha, _ = lora_alpha_for(
        scaling, init_r, float(method.get("scale", 2.0)), float(method.lora_alpha)
    )
    return AdaLoraConfig(
        target_r=target_r,
        init_r=init_r,
        tinit=steps.tinit,
        tfinal=steps.tfinal,
        deltaT=steps.delta_t,
        beta1=float(method.beta1),
        beta2=float(method.beta2),
        orth_reg_weight=float(method.orth_reg_weight),
        total_step=steps.total_step,
        lora_alpha=lora_alpha,
        lora_dropout=float(method.lora_dropout),
        target_modules=[c.name for c in candidates],
        modules_to_save=list(cfg.backbone.head_modules) or None,
        task_type=task_type,
    )


def attach_adalora(cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> PeftModel:
    """Wraps ``backbone`` with AdaLoRA on every candidate module (the head trains and is saved).

    Args:
        cfg: The run config (``rank``, ``train.max_steps``, ``method.*``,
            ``backbone.head_modules``).
        backbone: A freshly loaded backbone.
        candidates: The candidate modules (full paths).

    Returns:
        The peft model; call ``model.base_model.update_and_allocate(step)`` after every optimizer
        step (the harness does).
    """
    return get_peft_model(backbone, adalora_config(cfg, candidates, peft_task_type(backbone)))


def _tuner(peft_model: PeftModel):
    return peft_model.base_model


def final_ranks(peft_model: PeftModel) -> dict[str, int]:
    """Rank of each adapted module (full path): the allocated pattern once there is one.

    Before the first allocation every module has ``init_r``.
    """
    config = peft_model.peft_config[ADAPTER]
    pattern = config.rank_pattern or {}
    ranks = {}
    for name, param in _tuner(peft_model).model.named_parameters():
        if f"lora_E.{ADAPTER}" not in name:
            continue
        module = name.replace(f".lora_E.{ADAPTER}", "")
        flags = pattern.get(name, pattern.get(f"{module}.lora_E"))
        ranks[module] = int(sum(flags)) if flags is not None else int(param.shape[0])
    return ranks


def recipe(peft_model: PeftModel) -> dict[str, Any]:
    """The recipe the run trained with, in peft's terms and in steps (for ``results.json``).

    ``scaling`` is the factor the adapters apply, ``lora_alpha / init_r`` (peft divides by the
    initial rank, ``ranknum``, which pruning does not change).
    """
    config = peft_model.peft_config[ADAPTER]
    return {
        "lora_alpha": float(config.lora_alpha),
        "scaling": float(config.lora_alpha) / int(config.init_r),
        "tinit": int(config.tinit),
        "tfinal": int(config.tfinal),
        "delta_t": int(config.deltaT),
        "total_step": int(config.total_step),
        "orth_reg_weight": float(config.orth_reg_weight),
    }


def rank_summary(peft_model: PeftModel, candidates: list[Candidate]) -> dict[str, Any]:
    """Ranks after allocation against the budget, and the adapter parameters they keep.

    ``params`` counts what the final model uses: r_i (d_in + d_out + 1) per module (the +1 is
    the singular value); ``lora_params_at_target`` is LoRA at ``target_r`` on the same modules.
    """
    config = peft_model.peft_config[ADAPTER]
    ranks = final_ranks(peft_model)
    sizes = {c.name: c for c in candidates}
    params = sum(r * (sizes[m].d_in + sizes[m].d_out + 1) for m, r in ranks.items())
    return {
        "init_r": int(config.init_r),
        "target_r": int(config.target_r),
        "total_rank": sum(ranks.values()),
        "budget": int(config.target_r) * len(ranks),
        "allocated": config.rank_pattern is not None,
        "params": params,
        "lora_params_at_target": sum(sizes[m].lora_params(int(config.target_r)) for m in ranks),
        "ranks": ranks,
    }


@torch.no_grad()
def adapter_stats(peft_model: nn.Module) -> dict[str, float]:
    """How far the adapters have moved: what the trace in ``results.json`` records.

    ``e_norm``: the L2 norm of all singular values E (zero at initialisation); ``delta_w``: the
    Frobenius norm of all the updates the adapters add, ``scaling / ranknum * P diag(E) Q``
    (the same quantity for LoRA is ``scaling * B A``); ``orth``: peft's regulariser, the mean
    of ``||P^T P - I||_F`` over P and Q (before ``orth_reg_weight``); ``rank``: singular values
    that are not zero (pruned ones are).
    """
    e_sq = delta_sq = orth = 0.0
    count = rank = 0
    for module in _tuner(peft_model).model.modules():
        if not hasattr(module, "lora_E") or ADAPTER not in module.lora_E:
            continue
        left, values = module.lora_B[ADAPTER], module.lora_E[ADAPTER]
        right = module.lora_A[ADAPTER]
        scale = float(module.scaling[ADAPTER]) / (float(module.ranknum[ADAPTER]) + 1e-5)
        e_sq += float(values.pow(2).sum())
        rank += int((values != 0).sum())
        delta_sq += float(((left * values.T) @ right).pow(2).sum()) * scale**2
        for cov in (right @ right.T, left.T @ left):
            orth += float(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device)))
            count += 1
    return {
        "e_norm": math.sqrt(e_sq),
        "delta_w": math.sqrt(delta_sq),
        "orth": orth / max(1, count),
        "rank": rank,
    }


def allocator_state(peft_model: nn.Module) -> dict[str, Any] | None:
    """The rank allocator's state for a checkpoint (None for models that are not AdaLoRA)."""
    tuner = getattr(peft_model, "base_model", None)
    allocator = getattr(tuner, "rankallocator", None)
    if allocator is None:
        return None

    def cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in tensors.items()}

    return {
        "ipt": cpu(allocator.ipt),
        "exp_avg_ipt": cpu(allocator.exp_avg_ipt),
        "exp_avg_unc": cpu(allocator.exp_avg_unc),
        "rank_pattern": tuner.peft_config[tuner.trainable_adapter_name].rank_pattern,
    }


def load_allocator_state(peft_model: nn.Module, state: dict[str, Any] | None) -> None:
    """Restores :func:`allocator_state` (tensors go to their parameter's device).

    Call once the model is on its device (e.g. just before the first ``update_and_allocate`` of
    a resumed run); without it a run resumed in the final phase has no rank pattern to apply.
    """
    if state is None:
        return
    tuner = peft_model.base_model
    allocator = tuner.rankallocator
    devices = {n: p.device for n, p in tuner.model.named_parameters()}
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, key, {n: t.to(devices.get(n, t.device)) for n, t in state[key].items()})
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]


@register_method
class AdaLora(Method):
    """``method=adalora``: peft's AdaLoRA on every candidate, ranks allocated by importance.

    Its rank budget is ``rank`` per module (matched: the reference rank), its allocator runs
    after every weight step and its state travels in checkpoints. Every ``method.trace_every``
    steps it records :func:`adapter_stats` and the scheduled budget (``results.json``:
    ``adalora.trace``), the evidence that its adapters move at all.
    """

    name = "adalora"
    exports_adapter = True

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None  # allocator state awaiting its device
        self._trace_every = 0
        self._last_step = -1
        self._lr: float | None = None
        self.trace: list[dict[str, float]] = []

    def validate(self, cfg: DictConfig) -> None:
        target_rank = target_rank_of(cfg)
        initial_rank(float(cfg.method.init_ratio), target_rank or int(cfg.rank))
        if int(cfg.method.get("trace_every") or 0) < 0:
            raise ValueError(
                f"method.trace_every={cfg.method.trace_every}: steps between records, >= 0 "
                "(0: no trace)."
            )
        schedule(
            int(cfg.train.max_steps),
            float(cfg.method.tinit_ratio),
            float(cfg.method.tfinal_ratio),
            float(cfg.method.delta_t_ratio),
        )

    def matched_rank(self, rank, target_rank, candidates, budget, tolerance) -> int:
        return target_rank  # target_r is the final average rank: LoRA's at the same rank

    def build(self, cfg: DictConfig, backbone: nn.Module, candidates: list[Candidate]) -> Built:
        self._trace_every = int(cfg.method.get("trace_every") or 0)
        self._last_step = int(cfg.train.max_steps) - 1
        self._lr = float(cfg.train.lr)  # shared with every method: the recipe changes the scale
        model = attach_adalora(cfg, backbone, candidates)
        used = recipe(model)
        log.info(
            "AdaLoRA recipe: update scale %g (lora_alpha / init_r), lr %g (train.lr), tinit %d, "
            "tfinal %d, deltaT %d of %d steps, orth_reg_weight %g",
            used["scaling"],
            self._lr,
            used["tinit"],
            used["tfinal"],
            used["delta_t"],
            used["total_step"],
            used["orth_reg_weight"],
        )
        return Built(model, None, None)

    def after_weight_step(self, model: nn.Module, step: int) -> None:
        if self._pending is not None:  # restored here: the model is on its device by now
            load_allocator_state(model, self._pending)
            self.trace = list(self._pending.get("trace", []))
            self._pending = None
        tuner = model.base_model
        tuner.update_and_allocate(step)
        every = self._trace_every
        if every and (step % every == 0 or step == self._last_step):
            budget, _ = tuner.rankallocator.budget_schedule(step)
            self.trace.append({"step": step, "budget": budget, **adapter_stats(model)})

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any] | None:
        state = allocator_state(model)
        return None if state is None else {**state, "trace": list(self.trace)}

    def load_checkpoint_state(self, state: dict[str, Any] | None) -> None:
        self._pending = state

    def results(self, model: nn.Module, candidates: list[Candidate]) -> dict[str, Any]:
        summary = rank_summary(model, candidates)
        used = {"lr": self._lr, **recipe(model)}
        return {"adalora": {**summary, "recipe": used, "trace": self.trace}}
