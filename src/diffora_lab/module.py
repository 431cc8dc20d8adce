"""The training loop: alternating weight and architecture steps, then fine-tuning (Lightning).

METHOD.md, "Phase 1": every step is a weight step on a train batch (AdamW on LoRA A/B and the
head) followed, after ``warmup_steps``, by an architecture step on a search batch (Adam on the gate
logits only, first order). After the discretization callback flips :attr:`phase` to
``"finetune"``, only weight steps remain, on the kept adapters.

Manual optimization: Lightning owns the weight optimizer (so ``trainer.global_step`` counts weight
steps and matches :attr:`step`); the architecture optimizer is ours and is checkpointed by
:meth:`on_save_checkpoint`. Learning rates and the temperature are pure functions of the step, so
a resumed run needs no scheduler state.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from diffora_lab.adapters import LoraGates, apply_mask, count_parameters
from diffora_lab.architect import Architect, get_architect
from diffora_lab.backbones import Candidate
from diffora_lab.checkpointing import (
    STATE_FORMAT,
    STATE_KEY,
    BackboneFingerprint,
    fill,
    frozen_backbone_keys,
    our_state,
    strip_backbone,
)
from diffora_lab.config import OptimSettings, SearchSettings
from diffora_lab.dam import DAM, Mask
from diffora_lab.finite import FiniteLossChecks
from diffora_lab.methods import Method
from diffora_lab.rng import restore_rng_state, rng_state
from diffora_lab.searches import SearchVariant
from diffora_lab.tasks import TaskSpec
from diffora_lab.tasks.kinds import TaskKind, get_kind
from diffora_lab.validation import DevEvaluation

log = logging.getLogger(__name__)

SEARCH, FINETUNE = "search", "finetune"


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name


class TrainingModule(FiniteLossChecks, DevEvaluation, pl.LightningModule):
    """LightningModule for DiffoRA and the baselines that share its harness.

    Args:
        model: The backbone, wrapped by peft for LoRA-type methods.
        spec: The task (label count, metrics, dev splits).
        candidates: The DAM's candidate modules (empty for methods without adapters).
        optim: Weight optimizer settings and step budget.
        search: Search settings; ``search.enabled`` False starts directly in fine-tuning.
        dam: The gate logits (None without a search).
        mask: A mask already applied to ``model`` (methods without a search), or None.
        hparams: The resolved run config, stored in every checkpoint.
        method: The run's method: its per-step hook and checkpoint state (None: neither).
        variant: The search variant (searches/): where the search ends, its penalty and its cut
            (None without a search).
        kind: The task kind: dev evaluation step and metrics (None: the task's first kind).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: TaskSpec,
        candidates: list[Candidate],
        optim: OptimSettings,
        search: SearchSettings,
        dam: DAM | None = None,
        mask: Mask | None = None,
        hparams: dict[str, Any] | None = None,
        method: Method | None = None,
        variant: SearchVariant | None = None,
        kind: TaskKind | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.spec = spec
        self.candidates = candidates
        self.optim = optim
        self.search = search
        self.dam = dam
        self.mask = mask
        self.method = method if method is not None else Method()
        self.variant = variant
        self.phase = SEARCH if search.enabled else FINETUNE
        self.lora_gates = LoraGates(model, candidates) if self.phase == SEARCH else None
        self.step = 0  # weight-optimizer steps taken
        self.batches_seen = 0  # train batches consumed (differs from step with accumulation)
        self.search_batches_seen = 0
        self.discretization: dict[str, Any] = {}
        self.search_reused = False  # resumed from a shared end-of-search snapshot
        self.ranks_consistent: bool | None = None  # checked at the end of multi-process runs
        self.kind = kind if kind is not None else get_kind(spec.kinds[0])(spec)
        self.val_metrics = nn.ModuleList(self.kind.build_metrics() for _ in spec.dev_splits)
        self.architect: Architect | None = None  # built with the optimizers while searching
        self._arch_state: dict | None = None
        self._search_iter = None
        self.last_val: dict[str, float] = {}
        self.last_val_step: int | None = None  # the step of last_val, when this process scored it
        # First step with a non-finite loss per (phase, step kind), on the loss's device: read
        # only every optim.finite_check_every steps, so a step needs no host-device sync for it.
        self.reset_finite_checks()
        if hparams is not None:
            self.save_hyperparameters({"config": hparams})

    # ----------------------------------------------------------------- forward

    @property
    def searching(self) -> bool:
        return self.phase == SEARCH

    def current_gates(self) -> torch.Tensor:
        return self.dam.gates(self.tau())

    @property
    def search_finished(self) -> bool:
        """Still searching, but the search is done (the variant's cut step): discretize."""
        return self.searching and self.step >= self.variant.cut_step

    @property
    def arch_optimizer(self) -> torch.optim.Optimizer | None:
        """The architect's optimizer (Adam on the gate logits), None outside the search."""
        return None if self.architect is None else self.architect.optimizer

    def forward(self, batch: dict[str, torch.Tensor], gate_grad: bool = False):
        """Runs the model; while searching, the gates enter the LoRA branches first."""
        if self.searching:
            gates = self.current_gates()
            self.lora_gates.set(gates if gate_grad else gates.detach())
        return self.model(**batch)

    # ------------------------------------------------------------- optimizers

    def weight_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        named = self.weight_parameters()
        decay = [p for n, p in named if not _no_decay(n, p)]
        no_decay = [p for n, p in named if _no_decay(n, p)]
        log.info(
            "weight optimizer: %d tensors (%d params) with decay, %d (%d) without",
            len(decay),
            sum(p.numel() for p in decay),
            len(no_decay),
            sum(p.numel() for p in no_decay),
        )
        weights = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.optim.lr,
            **self.optim.adamw_options(),
        )
        if self.searching:
            shared = {id(self.dam.logits)} & {id(p) for _, p in named}
            if shared:
                raise RuntimeError("weight and architecture parameter sets overlap")
            self.architect = get_architect(self.search.arch_grad)(self.dam, self.search, self)
            if self._arch_state is not None:
                self.architect.load_state_dict(self._arch_state)
                self._arch_state = None
        return weights

    def _set_lr(self, optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ steps

    def on_fit_start(self) -> None:
        # from_pretrained leaves models in eval mode; the search and fine-tuning need dropout.
        self.model.train()

    def _next_search_batch(self) -> dict[str, torch.Tensor]:
        if self._search_iter is None:
            loader = self.trainer.datamodule.search_dataloader(start=self.search_batches_seen)
            self._search_iter = iter(loader)
        batch = next(self._search_iter)
        self.search_batches_seen += 1
        return self.trainer.strategy.batch_to_device(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        accumulate = self.optim.accumulate
        self.batches_seen += 1
        loss = self(batch).loss
        self._check_finite(loss, "weight")
        self.manual_backward(loss / accumulate)
        if self.batches_seen % accumulate:
            return loss.detach()
        self._set_lr(optimizer, self.optim.lr_at(self.step))
        if self.optim.grad_clip > 0:
            self.clip_gradients(optimizer, self.optim.grad_clip, "norm")
        optimizer.step()
        self._after_weight_step()
        optimizer.zero_grad(set_to_none=True)
        # Python floats would be copied to the device by Lightning at every step, and a blocking
        # host-to-device copy waits for the GPU: logged as CPU tensors they stay on the host.
        logs = {"train/loss": loss.detach(), "train/lr": torch.tensor(self.optim.lr_at(self.step))}
        if self.searching and self.step >= self.search.warmup_steps:
            logs.update(self._architecture_step(batch))
        self.step += 1
        if self.step % self.optim.finite_check_every == 0:
            self.check_finite()
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False)
        return loss.detach()

    def _after_weight_step(self) -> None:
        """The method's per-step hook (e.g. AdaLoRA's allocation reads this step's gradients)."""
        self.method.after_weight_step(self.model, self.step)

    def _architecture_step(self, train_batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One architecture step on the next search batch (the :class:`Architect`'s rule)."""
        logs = self.architect.step(train_batch, self._next_search_batch())
        # The architect's forward passes leave weight gradients behind: not for the next step.
        self.optimizers().zero_grad(set_to_none=True)
        return logs

    # The SearchHost interface (architect.py): what the architecture step needs from this loop.

    def gated_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self(batch, gate_grad=True).loss
        self._check_finite(loss, "architecture")
        return loss

    def backward_to(self, loss: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        if self.trainer.world_size > 1:
            # DDP's reducer expects every used parameter to receive a gradient; a backward
            # restricted to the gate logits would leave it waiting. The adapters' gradients
            # computed here are discarded before the next weight step.
            self.manual_backward(loss)
        else:
            self.manual_backward(loss, inputs=inputs)

    def weight_tensors(self) -> list[nn.Parameter]:
        return [p for _, p in self.weight_parameters()]

    def weight_lr(self) -> float:
        return self.optim.lr_at(self.step)

    def tau(self) -> float:
        return self.search.tau_at(self.step)

    def search_penalty(self):
        return None if self.variant is None else self.variant.penalty()

    # --------------------------------------------------------- discretization

    def propose_mask(self, backbone: str) -> tuple[Mask, torch.Tensor]:
        """The search variant's cut of the current gates under the budget, and those gates."""
        gates = self.current_gates().detach()
        mask = Mask.of(
            self.variant.cut(self.dam, gates),
            gates,
            [c.name for c in self.candidates],
            self.dam.module_types,
            self.variant.budget,
            self.step,
            backbone=backbone,
        )
        return mask, gates

    def record_discretization(
        self, val_before: dict[str, float], val_after: dict[str, float]
    ) -> dict[str, float]:
        """Keeps the dev metrics around the discretization; returns the ``dam/`` metrics to log."""
        primary = f"val/{self.spec.primary_metric}"
        self.discretization = {
            "step": self.step,
            "val_before": val_before.get(primary),
            "val_after": val_after.get(primary),
            "before": val_before,
            "after": val_after,
        }
        return {
            "dam/val_before": val_before[primary],
            "dam/val_after": val_after[primary],
            "dam/gap": val_before[primary] - val_after[primary],
            "dam/kept": float(self.mask.k),
            "params/trainable": float(self.trainable_parameters()["total"]),
        }

    def discretize(self, mask: Mask, gates: torch.Tensor) -> None:
        """Freezes ``mask`` into the model (METHOD.md, Phase 2) and switches to fine-tuning.

        Dropped adapters are removed; kept ones continue from their search weights with the gate
        folded into B (or re-initialised when ``dam.weight_sharing`` is off). The architecture
        optimizer and the search loader stop; the weight optimizer is rebuilt over what remains.
        """
        self._enter_finetune(
            mask, gates, fold_gates=self.search.fold_gates, reinit=not self.search.weight_sharing
        )
        self.architect = None
        self._search_iter = None
        self.trainer.strategy.optimizers = [self.configure_optimizers()]

    def _enter_finetune(
        self, mask: Mask, gates: torch.Tensor | None, fold_gates: bool, reinit: bool
    ) -> None:
        """Removes the gates, applies ``mask`` to the adapters and freezes the DAM."""
        self.lora_gates.remove()
        self.lora_gates = None
        apply_mask(
            self.model, self.candidates, mask.kept, gates, fold_gates=fold_gates, reinit=reinit
        )
        self.dam.logits.requires_grad_(False)
        self.mask = mask
        self.phase = FINETUNE

    # ------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # never write non-finite weights
        # The frozen backbone is reloaded from its source on resume: only a fingerprint is kept.
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = BackboneFingerprint()
        backbone = strip_backbone(checkpoint, self, self._fingerprint)
        checkpoint[STATE_KEY] = {
            "format": STATE_FORMAT,
            "backbone": backbone,
            "phase": self.phase,
            "step": self.step,
            "batches_seen": self.batches_seen,
            "search_batches_seen": self.search_batches_seen,
            "arch_optimizer": self.architect.state_dict() if self.architect else None,
            "mask": None if self.mask is None else vars(self.mask).copy(),
            "discretization": dict(self.discretization),
            "method": self.method.checkpoint_state(self.model),
            "search_variant": self.variant.state_dict() if self.variant is not None else None,
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = our_state(checkpoint, "ckpt_path: the checkpoint")
        self.step = state["step"]
        self.batches_seen = state["batches_seen"]
        self.search_batches_seen = state["search_batches_seen"]
        self.discretization = dict(state["discretization"])
        self._arch_state = state["arch_optimizer"]
        self.method.load_checkpoint_state(state.get("method"))
        if self.variant is not None:
            self.variant.load_state_dict(state.get("search_variant"))
        if state["phase"] == FINETUNE and self.phase == SEARCH:
            # Restore the structure only: the state dict that follows holds the folded weights.
            self._enter_finetune(Mask(**state["mask"]), None, fold_gates=False, reinit=False)
        # In the checkpoint's structure now: put the frozen backbone back (refused if another).
        fill(
            checkpoint["state_dict"],
            self.state_dict(),
            frozen_backbone_keys(self),
            state.get("backbone"),
        )
        datamodule = self.trainer.datamodule
        datamodule.train_start = self.batches_seen
        restore_rng_state(state["rng"])

    def on_train_end(self) -> None:
        if self.trainer.world_size > 1:
            self.ranks_consistent = self.check_ranks_consistent()

    def check_ranks_consistent(self) -> bool:
        """True when every rank holds the same gates, mask and trainable weights."""
        state = [p.detach().double().flatten() for _, p in self.weight_parameters()]
        if self.dam is not None:
            state.append(self.dam.logits.detach().double().flatten())
        if self.mask is not None:
            state.append(torch.tensor(self.mask.kept, dtype=torch.float64, device=self.device))
        local = torch.cat(state)  # parameters and mask, all on this rank's device
        gathered = self.trainer.strategy.all_gather(local)
        return bool(torch.all(gathered == gathered[0:1]).item())

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameters: adapter, head, backbone and total."""
        heads = (self.hparams.get("config") or {}).get("backbone", {}).get("head_modules")
        return count_parameters(self.model, tuple(heads or ("classifier", "pooler")))
