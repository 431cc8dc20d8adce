"""The architecture step (METHOD.md, "Phase 1"): how the gate logits move on a search batch.

As in DARTS, one object owns the update rule of the architecture parameters and its optimizer:
:meth:`Architect.step` takes a train batch and a search batch, computes the gate gradient, adds
the search variant's penalty gradient, steps Adam on the logits and returns what to log. The
training loop (:class:`~diffora_lab.module.TrainingModule`) calls it after each weight step while
searching and knows nothing of the rule; the gates themselves always come from
:meth:`~diffora_lab.dam.DAM.gates` (the relaxation lives there).

Architecture-gradient rules are registered under ``dam.arch_grad``: ``first`` (DARTS-1st, the
default) and ``second`` (one unrolled virtual weight step). A new rule is a subclass that
overrides :meth:`Architect.gate_grad` (or :meth:`Architect.step`) and is decorated with
:func:`register_architect`. (Search variants, which decide the relaxation, the pruning and the
cut, are another registry: ``searches/``, chosen with ``search=``.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from diffora_lab.dam import DAM, gate_entropy

Batch = dict[str, torch.Tensor]


class SearchHost(Protocol):
    """What an architect needs from the training loop (the LightningModule implements it)."""

    def gated_loss(self, batch: Batch) -> torch.Tensor:
        """The loss on ``batch`` with gates that carry gradient (checked finite)."""

    def backward_to(self, loss: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        """Backpropagates ``loss`` into ``inputs`` (the host may widen that, e.g. under DDP)."""

    def weight_tensors(self) -> list[nn.Parameter]:
        """The weights the weight optimizer trains."""

    def weight_lr(self) -> float:
        """The weight learning rate at the current step."""

    def tau(self) -> float:
        """The gate temperature at the current step."""

    def search_penalty(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The search variant's term of the architecture loss, as a function of the gates."""


class ArchitectSettings(Protocol):
    """The search settings an architect reads (:class:`~diffora_lab.config.SearchSettings`)."""

    arch_lr: float
    arch_betas: tuple[float, float]
    arch_weight_decay: float


class Architect:
    """DARTS-1st: the gate gradient is the search loss's gradient at the current weights.

    ``supports_ddp``: whether the rule runs with ``trainer.devices > 1``.

    Args:
        dam: The gate logits (the only parameters this object updates).
        settings: Optimizer and penalty settings.
        host: The training loop (forward with gates, backward, weights, learning rate, tau).
    """

    supports_ddp = True

    def __init__(self, dam: DAM, settings: ArchitectSettings, host: SearchHost) -> None:
        self.dam = dam
        self.settings = settings
        self.host = host
        self.optimizer = torch.optim.Adam(
            [dam.logits],
            lr=settings.arch_lr,
            betas=settings.arch_betas,
            weight_decay=settings.arch_weight_decay,
        )

    def step(self, train_batch: Batch, search_batch: Batch) -> dict[str, Any]:
        """One architecture step: only the gate logits move. Returns the step's logs."""
        loss = self.gate_grad(train_batch, search_batch)
        self.add_penalty_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        gates = self.dam.gates(self.host.tau()).detach()
        return {
            "search/loss": loss.detach(),
            "search/tau": torch.tensor(self.host.tau()),  # a host tensor: no copy to the device
            # Tensors, not floats: logging reads them only every log_every steps, so the search
            # step does not wait for the GPU here.
            "dam/entropy": gate_entropy(gates),
            "dam/mean": gates.mean(),
        }

    def gate_grad(self, train_batch: Batch, search_batch: Batch) -> torch.Tensor:
        """Leaves the gate gradient in ``dam.logits.grad``; returns the search loss."""
        loss = self.host.gated_loss(search_batch)
        self.host.backward_to(loss, [self.dam.logits])
        return loss

    def add_penalty_grads(self) -> None:
        """Adds the gradient of the search variant's penalty (if it has one) to the logits.

        E.g. ``search=budget_penalty`` (ours, not the paper's): without a pull towards the
        budget the gates drift towards 1 together, so the cut drops modules that were still
        active and the discretization gap grows. The penalty is the same on every rank.
        """
        term = self.host.search_penalty()
        if term is None:
            return
        penalty = term(self.dam.gates(self.host.tau()))
        (grad,) = torch.autograd.grad(penalty, self.dam.logits)
        if self.dam.logits.grad is None:
            self.dam.logits.grad = grad
        else:
            self.dam.logits.grad += grad

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (the optimizer's moments)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


_ARCHITECTS: dict[str, type[Architect]] = {}


def register_architect(name: str) -> Callable[[type[Architect]], type[Architect]]:
    """Class decorator: makes an :class:`Architect` subclass selectable as ``dam.arch_grad=NAME``.

    Args:
        name: The name ``dam.arch_grad`` selects it by.
    """

    def add(cls: type[Architect]) -> type[Architect]:
        if name in _ARCHITECTS and _ARCHITECTS[name] is not cls:
            raise ValueError(f"architect {name!r} is registered twice")
        _ARCHITECTS[name] = cls
        return cls

    return add


def architect_names() -> list[str]:
    """The registered architecture-gradient rules (what ``dam.arch_grad`` accepts)."""
    return sorted(_ARCHITECTS)


def get_architect(name: str) -> type[Architect]:
    """The architect class registered as ``name``.

    Raises:
        ValueError: An unknown name; the message lists the registered ones.
    """
    try:
        return _ARCHITECTS[str(name)]
    except KeyError:
        raise ValueError(
            f"dam.arch_grad={name!r}: unknown architecture-gradient rule; choose one of "
            f"{architect_names()}."
        ) from None


register_architect("first")(Architect)


@register_architect("second")
class SecondOrderArchitect(Architect):
    """DARTS-2nd: the search-loss gradient after one virtual weight step.

    grad = d/dtheta L_search(w', theta) - xi * (d/dtheta L_train(w+) - d/dtheta L_train(w-))
    / (2 eps), with w' = w - xi grad_w L_train(w), w+- = w +- eps grad_w' L_search(w') and xi the
    current weight learning rate (finite-difference Hessian-vector product). One device only:
    the virtual step is not synchronised across ranks.
    """

    supports_ddp = False

    def gate_grad(self, train_batch: Batch, search_batch: Batch) -> torch.Tensor:
        theta = self.dam.logits
        weights = self.host.weight_tensors()
        saved = [w.detach().clone() for w in weights]
        xi = self.host.weight_lr()

        def shift(direction: list[torch.Tensor], scale: float) -> None:
            with torch.no_grad():
                for w, w0, d in zip(weights, saved, direction):
                    w.copy_(w0 + scale * d)

        def grads_or_zeros(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]

        train_grads = grads_or_zeros(self.host.gated_loss(train_batch), weights)
        shift(train_grads, -xi)  # the virtual step w'
        loss = self.host.gated_loss(search_batch)
        theta_grad, *search_grads = grads_or_zeros(loss, [theta, *weights])
        eps = 0.01 / (torch.sqrt(sum((g * g).sum() for g in search_grads)) + 1e-12)
        curvature = []
        for sign in (1.0, -1.0):
            shift(search_grads, sign * float(eps))
            loss_shifted = self.host.gated_loss(train_batch)
            curvature.append(torch.autograd.grad(loss_shifted, theta)[0])
        shift(search_grads, 0.0)  # restore w
        theta.grad = theta_grad - xi * (curvature[0] - curvature[1]) / (2 * float(eps))
        return loss
