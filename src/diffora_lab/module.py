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
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from diffora_lab.adalora import allocator_state, load_allocator_state
from diffora_lab.adapters import LoraGates, apply_mask, count_parameters
from diffora_lab.backbones import Candidate
from diffora_lab.config import OptimSettings, SearchSettings
from diffora_lab.dam import DAM, Mask, gate_entropy
from diffora_lab.metrics import build_metrics, predictions_from_logits
from diffora_lab.tasks import TaskSpec

log = logging.getLogger(__name__)

SEARCH, FINETUNE = "search", "finetune"


def _numpy_state() -> list:
    # Plain Python values: Lightning loads checkpoints with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name


class DiffoRAModule(pl.LightningModule):
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
        self.phase = SEARCH if search.enabled else FINETUNE
        self.lora_gates = LoraGates(model, candidates) if self.phase == SEARCH else None
        self.step = 0  # weight-optimizer steps taken
        self.batches_seen = 0  # train batches consumed (differs from step with accumulation)
        self.search_batches_seen = 0
        self.discretization: dict[str, Any] = {}
        self.search_reused = False  # resumed from a shared end-of-search snapshot
        self._adalora_state: dict | None = None  # AdaLoRA allocator state awaiting restore
        self.ranks_consistent: bool | None = None  # checked at the end of multi-process runs
        self.val_metrics = nn.ModuleList(build_metrics(spec) for _ in spec.dev_splits)
        self.arch_optimizer: torch.optim.Optimizer | None = None
        self._arch_state: dict | None = None
        self._search_iter = None
        self.last_val: dict[str, float] = {}
        # First step with a non-finite loss per (phase, step kind), on the loss's device: read
        # only every optim.finite_check_every steps, so a step needs no host-device sync for it.
        self._first_nonfinite: dict[tuple[str, str], torch.Tensor] = {}
        self._checked_at = 0
        if hparams is not None:
            self.save_hyperparameters({"config": hparams})

    # ----------------------------------------------------------------- forward

    @property
    def searching(self) -> bool:
        return self.phase == SEARCH

    def current_gates(self) -> torch.Tensor:
        return self.dam.gates(self.search.tau_at(self.step))

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
            arch = [self.dam.logits]
            shared = {id(p) for p in arch} & {id(p) for _, p in named}
            if shared:
                raise RuntimeError("weight and architecture parameter sets overlap")
            self.arch_optimizer = torch.optim.Adam(
                arch,
                lr=self.search.arch_lr,
                betas=self.search.arch_betas,
                weight_decay=self.search.arch_weight_decay,
            )
            if self._arch_state is not None:
                self.arch_optimizer.load_state_dict(self._arch_state)
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
        """AdaLoRA's rank allocation needs the gradients of the step just taken."""
        allocate = getattr(getattr(self.model, "base_model", None), "update_and_allocate", None)
        if allocate is not None:
            if self._adalora_state is not None:
                load_allocator_state(self.model, self._adalora_state)
                self._adalora_state = None
            allocate(self.step)

    def _architecture_step(self, train_batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One architecture step on a search batch: only the gate logits move."""
        batch = self._next_search_batch()
        if self.search.order == "second":
            loss = self._second_order_gate_grad(train_batch, batch)
        else:
            loss = self._first_order_gate_grad(batch)
        if self.search.budget_penalty > 0:
            self._add_budget_penalty_grad()
        self.arch_optimizer.step()
        self.arch_optimizer.zero_grad(set_to_none=True)
        self.optimizers().zero_grad(set_to_none=True)
        gates = self.current_gates().detach()
        return {
            "search/loss": loss.detach(),
            "search/tau": torch.tensor(self.search.tau_at(self.step)),  # on the host (see above)
            # Tensors, not floats: logging reads them only every log_every steps, so the search
            # step does not wait for the GPU here.
            "dam/entropy": gate_entropy(gates),
            "dam/mean": gates.mean(),
        }

    def _add_budget_penalty_grad(self) -> None:
        """Adds the gradient of ``budget_penalty * (mean(gamma) - budget)^2`` to theta.

        Our option, not the paper's: without it the gates drift towards 1 together (the
        search loss prefers more adaptation), so the top-k cut drops modules that were still
        active and the discretization gap grows. The penalty is the same on every rank.
        """
        gates = self.current_gates()
        penalty = self.search.budget_penalty * (gates.mean() - self.search.budget) ** 2
        (grad,) = torch.autograd.grad(penalty, self.dam.logits)
        if self.dam.logits.grad is None:
            self.dam.logits.grad = grad
        else:
            self.dam.logits.grad += grad

    def _first_order_gate_grad(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """DARTS-1st: the gradient of the search loss at the current weights."""
        loss = self(batch, gate_grad=True).loss
        self._check_finite(loss, "architecture")
        if self.trainer.world_size > 1:
            # DDP's reducer expects every used parameter to receive a gradient; a backward
            # restricted to the gate logits would leave it waiting. The adapters' gradients
            # computed here are discarded before the next weight step.
            self.manual_backward(loss)
        else:
            self.manual_backward(loss, inputs=[self.dam.logits])
        return loss

    def _second_order_gate_grad(
        self, train_batch: dict[str, torch.Tensor], search_batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """DARTS-2nd: the search-loss gradient after one virtual weight step.

        grad = d/dtheta L_search(w', theta) - xi * (d/dtheta L_train(w+) - d/dtheta L_train(w-))
        / (2 eps), with w' = w - xi grad_w L_train(w), w+- = w +- eps grad_w' L_search(w') and
        xi the current weight learning rate (finite-difference Hessian-vector product).
        """
        theta = self.dam.logits
        weights = [p for _, p in self.weight_parameters()]
        saved = [w.detach().clone() for w in weights]
        xi = self.optim.lr_at(self.step)

        def shift(direction: list[torch.Tensor], scale: float) -> None:
            with torch.no_grad():
                for w, w0, d in zip(weights, saved, direction):
                    w.copy_(w0 + scale * d)

        train_loss = self(train_batch, gate_grad=True).loss
        train_grads = torch.autograd.grad(train_loss, weights, allow_unused=True)
        train_grads = [
            torch.zeros_like(w) if g is None else g for w, g in zip(weights, train_grads)
        ]
        shift(train_grads, -xi)  # the virtual step w'
        loss = self(search_batch, gate_grad=True).loss
        self._check_finite(loss, "architecture")
        grads = torch.autograd.grad(loss, [theta, *weights], allow_unused=True)
        theta_grad = grads[0]
        search_grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads[1:])]
        eps = 0.01 / (torch.sqrt(sum((g * g).sum() for g in search_grads)) + 1e-12)
        curvature = []
        for sign in (1.0, -1.0):
            shift(search_grads, sign * float(eps))
            loss_shifted = self(train_batch, gate_grad=True).loss
            curvature.append(torch.autograd.grad(loss_shifted, theta)[0])
        shift(search_grads, 0.0)  # restore w
        theta.grad = theta_grad - xi * (curvature[0] - curvature[1]) / (2 * float(eps))
        return loss

    def _check_finite(self, loss: torch.Tensor, which: str) -> None:
        if self.optim.finite_check_every <= 1:  # reads the loss now: one sync per step
            if not torch.isfinite(loss):
                self._diverged(which, self.phase, self.step, f" ({float(loss)})")
            return
        key = (self.phase, which)
        first = self._first_nonfinite.get(key)
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = torch.logical_not(torch.isfinite(loss.detach()))
        self._first_nonfinite[key] = torch.where(bad & (first < 0), self.step, first)

    def check_finite(self) -> None:
        """Raises ``FloatingPointError`` if a loss since the last check was not finite.

        Called every ``train.finite_check_every`` steps, before a checkpoint is written and
        before each evaluation, so a run stops within that many steps of diverging and never
        saves non-finite weights. This is the only point that waits for the device.
        """
        if not self._first_nonfinite:
            return
        firsts = torch.stack(list(self._first_nonfinite.values())).tolist()  # the sync
        bad = [(step, key) for step, key in zip(firsts, self._first_nonfinite) if step >= 0]
        if bad:
            step, (phase, which) = min(bad)
            since = f" (checked every {self.optim.finite_check_every} steps, "
            since += f"steps {self._checked_at}-{self.step})"
            self._diverged(which, phase, step, since)
        self._checked_at = self.step

    def _diverged(self, which: str, phase: str, step: int, detail: str) -> None:
        raise FloatingPointError(
            f"non-finite {which} loss at step {step} in phase {phase!r}{detail}; the last good "
            "checkpoint is in the run's checkpoints/ folder. Lower train.lr or dam.arch_lr, or "
            "enable train.grad_clip."
        )

    # ------------------------------------------------------------- validation

    def _metric_key(self, split_index: int, metric: str) -> str:
        if split_index == 0:
            return f"val/{metric}"
        return f"val/{metric}_{self.spec.dev_splits[split_index]}"

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        labels = batch.pop("labels")
        logits = self(batch).logits
        self.val_metrics[dataloader_idx].update(predictions_from_logits(self.spec, logits), labels)

    def on_validation_epoch_end(self) -> None:
        self.check_finite()
        results = {}
        for index, metrics in enumerate(self.val_metrics):
            for name, value in metrics.compute().items():
                results[self._metric_key(index, name)] = float(value)
            metrics.reset()
        self.last_val = results
        if not self.trainer.sanity_checking:
            # torchmetrics already synced the states: every rank holds the same values.
            self.log_dict(results, prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev metrics of the model as it is now (used around discretization)."""
        self.check_finite()
        was_training = self.model.training
        self.model.eval()
        loaders = self.trainer.datamodule.val_dataloader()
        results = {}
        for index, loader in enumerate(loaders):
            metrics = build_metrics(self.spec).to(self.device)
            for batch in loader:
                batch = self.trainer.strategy.batch_to_device(batch)
                labels = batch.pop("labels")
                metrics.update(predictions_from_logits(self.spec, self(batch).logits), labels)
            for name, value in metrics.compute().items():
                results[self._metric_key(index, name)] = float(value)
        self.model.train(was_training)
        return results

    # --------------------------------------------------------- discretization

    def discretize(self, mask: Mask, gates: torch.Tensor) -> None:
        """Freezes ``mask`` into the model (METHOD.md, Phase 2) and switches to fine-tuning.

        Dropped adapters are removed; kept ones continue from their search weights with the gate
        folded into B (or re-initialised when ``dam.weight_sharing`` is off). The architecture
        optimizer and the search loader stop; the weight optimizer is rebuilt over what remains.
        """
        self._enter_finetune(
            mask, gates, fold_gates=self.search.fold_gates, reinit=not self.search.weight_sharing
        )
        self.arch_optimizer = None
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
        checkpoint["diffora"] = {
            "phase": self.phase,
            "step": self.step,
            "batches_seen": self.batches_seen,
            "search_batches_seen": self.search_batches_seen,
            "arch_optimizer": self.arch_optimizer.state_dict() if self.arch_optimizer else None,
            "mask": None if self.mask is None else vars(self.mask).copy(),
            "discretization": dict(self.discretization),
            "adalora": allocator_state(self.model),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_state(),
                "python": random.getstate(),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("diffora")
        if state is None:
            raise ValueError("ckpt_path: this checkpoint was not written by diffora_lab")
        self.step = state["step"]
        self.batches_seen = state["batches_seen"]
        self.search_batches_seen = state["search_batches_seen"]
        self.discretization = dict(state["discretization"])
        self._arch_state = state["arch_optimizer"]
        self._adalora_state = state.get("adalora")  # restored at the first step, on device
        if state["phase"] == FINETUNE and self.phase == SEARCH:
            # Restore the structure only: the state dict that follows holds the folded weights.
            self._enter_finetune(Mask(**state["mask"]), None, fold_gates=False, reinit=False)
        datamodule = self.trainer.datamodule
        datamodule.train_start = self.batches_seen
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(
            tuple(rng["numpy"][:1])
            + (np.array(rng["numpy"][1], dtype=np.uint32),)
            + tuple(rng["numpy"][2:])
        )
        random.setstate(rng["python"])

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
