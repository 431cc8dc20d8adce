"""The Architect: the architecture step as one object, selected by ``dam.arch_grad``, extensible."""

from __future__ import annotations

import pytest
import torch

from diffora_lab import architect, train
from diffora_lab.config import validate
from diffora_lab.dam import Mask
from diffora_lab.train import assemble, prepare

SEARCH_STEPS, WARMUP, MAX_STEPS = 6, 2, 8


class ConstantPush(architect.Architect):
    """A gradient rule for the test: every gate gradient is 1, whatever the loss says.

    Adam turns a constant gradient into steps of (almost exactly) ``arch_lr``, so after N
    architecture steps every logit is ``init - N * arch_lr``: only this variant can do that.
    """

    calls = 0

    def gate_grad(self, train_batch, search_batch):
        type(self).calls += 1
        loss = self.host.gated_loss(search_batch)  # still a real forward on the search batch
        self.dam.logits.grad = torch.ones_like(self.dam.logits)
        return loss


@pytest.fixture
def constant_push():
    architect.register_architect("constant_push_test")(ConstantPush)
    ConstantPush.calls = 0
    yield ConstantPush
    architect._ARCHITECTS.pop("constant_push_test")


def test_unknown_rule_lists_the_registered_ones(smoke_cfg):
    with pytest.raises(ValueError, match=r"dam\.arch_grad='third'.*\['first', 'second'\]"):
        validate(smoke_cfg("dam.arch_grad=third"))


def test_the_old_name_dam_order_says_the_new_one(smoke_cfg):
    message = r"dam\.order='second': renamed: use dam\.arch_grad=second"
    with pytest.raises(ValueError, match=message):
        validate(smoke_cfg("dam.order=second"))


@pytest.mark.slow
def test_a_registered_variant_drives_the_search(constant_push, smoke_cfg, tmp_path):
    cfg = smoke_cfg(
        "logger=none",
        "method=diffora_faithful",  # no module leaves early: every gate ends where it was pushed
        "dam.arch_grad=constant_push_test",
        f"train.max_steps={MAX_STEPS}",
        f"dam.search_steps={SEARCH_STEPS}",
        f"dam.warmup_steps={WARMUP}",
        "dam.arch_lr=0.1",
        "dam.init=0.0",
        "dam.reuse_search=false",
    )
    results = train.run(cfg, tmp_path / "run")
    arch_steps = SEARCH_STEPS - WARMUP
    assert constant_push.calls == arch_steps
    mask = Mask.load(tmp_path / "run" / "dam" / "mask.json")
    # Every gate moved the same way by the same amount: the final gates are all equal, at
    # sigmoid(-arch_steps * arch_lr), and the search loss had no say.
    expected = torch.sigmoid(torch.tensor(-arch_steps * 0.1)).item()
    assert mask.gates == pytest.approx([expected] * len(mask.gates), abs=1e-5)
    assert results["steps"] == MAX_STEPS


@pytest.mark.parametrize("unit", ["modules", "params"])
def test_budget_penalty_gradient_matches_its_closed_form(smoke_cfg, unit):
    cfg = smoke_cfg(
        "search=budget_penalty",
        "search.weight=3.0",
        "budget=0.25",
        f"budget_unit={unit}",
        "dam.tau=2.0",
        "dam.tau_end=2.0",
    )
    module = assemble(cfg, prepare(cfg)).module
    with torch.no_grad():
        module.dam.logits.copy_(torch.linspace(-2.0, 2.0, module.dam.logits.numel()).view(-1, 6))
    module.configure_optimizers()
    module.architect.add_penalty_grads()
    theta, tau, lam, budget = module.dam.logits.detach(), 2.0, 3.0, 0.25
    gates = torch.sigmoid(theta / tau)
    # Weights: each module's size in the budget's unit (r (d_in + d_out), or 1 per module).
    if unit == "params":
        sizes = torch.tensor([8.0 * (c.d_in + c.d_out) for c in module.candidates])
    else:
        sizes = torch.ones(gates.numel())
    w = (sizes / sizes.sum()).view_as(gates)
    # d/dtheta_i lam (sum w g - b)^2 = 2 lam (sum w g - b) w_i g_i (1 - g_i) / tau; the share is
    # the budget itself here (3 of 12 modules; a quarter of the parameters)
    mean = (w * gates).sum()
    expected = 2 * lam * (mean - budget) * w * gates * (1 - gates) / tau
    torch.testing.assert_close(module.dam.logits.grad, expected)
    # Off by default: no gradient at all.
    plain = assemble(smoke_cfg(), prepare(smoke_cfg())).module
    plain.configure_optimizers()
    plain.architect.add_penalty_grads()
    assert plain.dam.logits.grad is None


def test_dam_arch_grad_selects_the_architect_class(smoke_cfg):
    cfg = smoke_cfg()
    module = assemble(cfg, prepare(cfg)).module
    assert isinstance(module.architect, type(None))  # built with the optimizers
    module.configure_optimizers()
    assert type(module.architect) is architect.Architect
    second = smoke_cfg("dam.arch_grad=second")
    module2 = assemble(second, prepare(second)).module
    module2.configure_optimizers()
    assert type(module2.architect) is architect.SecondOrderArchitect
    assert module2.arch_optimizer is module2.architect.optimizer


def test_second_order_gate_gradient_matches_finite_differences_of_the_unrolled_loss(smoke_cfg):
    """DARTS-2nd's gate gradient is d/dtheta of L_search(w - xi grad_w L_train(w, theta), theta).

    Checked along random directions against central differences of that unrolled loss, on the
    tiny model in float64 with dropout off (eval mode) and random LoRA B (so neither term of the
    gradient vanishes). The first-order gradient misses the unrolled term by far more than the
    tolerance, so the check tells the two rules apart; the virtual step is undone exactly.
    """
    cfg = smoke_cfg("method=diffora_faithful", "train.lr=0.5", "data.bucketing=0")
    parts = assemble(cfg, prepare(cfg))
    module = parts.module.double().eval()
    module.configure_optimizers()
    module.step = module.search.warmup_steps  # the first architecture step
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        module.dam.logits.copy_(torch.randn(module.dam.shape, generator=generator))
    loader = parts.datamodule.train_dataloader()
    train_batch, search_batch = (batch for batch, _ in zip(loader, range(2)))
    weights = module.weight_tensors()
    before = [w.detach().clone() for w in weights]
    theta0 = module.dam.logits.detach().clone()
    xi = module.weight_lr()
    assert xi > 0.1  # a large virtual step: the second-order term is far from negligible

    def unrolled(theta: torch.Tensor) -> float:
        with torch.no_grad():
            module.dam.logits.copy_(theta)
        grads = torch.autograd.grad(module.gated_loss(train_batch), weights, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                if g is not None:
                    w.sub_(xi * g)
            value = module.gated_loss(search_batch).item()
            for w, w0 in zip(weights, before):
                w.copy_(w0)
        return value

    module.dam.logits.grad = None
    architect.SecondOrderArchitect(module.dam, module.search, module).gate_grad(
        train_batch, search_batch
    )
    second = module.dam.logits.grad.detach().clone()
    for w, w0 in zip(weights, before):
        assert torch.equal(w, w0)  # the virtual step and the curvature probes are undone
    # The first-order rule's gradient (Architect.gate_grad without a trainer's backward).
    (first,) = torch.autograd.grad(module.gated_loss(search_batch), module.dam.logits)
    h = 1e-4
    for seed in range(3):
        direction = torch.randn(
            theta0.shape, dtype=theta0.dtype, generator=generator.manual_seed(seed)
        )
        direction /= direction.norm()
        numeric = (unrolled(theta0 + h * direction) - unrolled(theta0 - h * direction)) / (2 * h)
        assert (second * direction).sum().item() == pytest.approx(numeric, rel=2e-3, abs=1e-7)
        assert abs((first * direction).sum().item() - numeric) > 20 * (2e-3 * abs(numeric) + 1e-7)
