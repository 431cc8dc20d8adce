"""Tests for diffora_lab.module and the Discretization callback, driven by a real Trainer.

The smoke config (tiny DeBERTa, synthetic task) is wired exactly as ``train.run`` wires it; the
module is subclassed only to record what each step did.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from conftest import compose_config
from omegaconf import open_dict

from diffora_lab.callbacks import Discretization
from diffora_lab.data import TaskDataModule
from diffora_lab.module import TrainingModule
from diffora_lab.train import assemble, build_trainer, prepare


def snapshot(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


class RecordingModule(TrainingModule):
    """TrainingModule that records parameters around each architecture step and train modes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arch_records: list[dict] = []
        self.modes: list[tuple[int, str, bool]] = []

    def training_step(self, batch, batch_idx):
        self.modes.append((self.step, self.phase, all(m.training for m in self.model.modules())))
        return super().training_step(batch, batch_idx)

    def _architecture_step(self, *args, **kwargs):
        before = snapshot(self)
        leaked = self.dam.logits.grad  # what the weight step left on the logits
        logs = super()._architecture_step(*args, **kwargs)
        weight_grads = [n for n, p in self.weight_parameters() if p.grad is not None]
        self.arch_records.append(
            {
                "step": self.step,
                "before": before,
                "after": snapshot(self),
                "grads": weight_grads,
                "leaked": leaked,
            }
        )
        return logs


class StepSnapshots(pl.Callback):
    """Parameters at the start and end of every training batch."""

    def __init__(self) -> None:
        self.start: dict[int, dict] = {}
        self.end: dict[int, dict] = {}
        self.phase: dict[int, str] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.start[module.step] = snapshot(module)
        self.phase[module.step] = module.phase

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.end[module.step - 1] = snapshot(module)


@dataclass
class Wired:
    module: TrainingModule
    datamodule: TaskDataModule
    cfg: object


def wire(cfg, module_cls=TrainingModule) -> Wired:
    """Builds module and data exactly as ``train.run`` does."""
    prepared = prepare(cfg)
    pl.seed_everything(int(cfg.seed), verbose=False)
    assembled = assemble(cfg, prepared, module_cls)
    return Wired(assembled.module, assembled.datamodule, cfg)


def fit(wired: Wired, output_dir, callbacks) -> pl.Trainer:
    # Not a user setting (refused by prepare: train.run always checkpoints): no files here.
    with open_dict(wired.cfg):
        wired.cfg.trainer.enable_checkpointing = False
    trainer = build_trainer(wired.cfg, output_dir, False, callbacks)
    trainer.fit(wired.module, datamodule=wired.datamodule)
    return trainer


SEARCH_STEPS, WARMUP, MAX_STEPS = 6, 2, 10


@pytest.fixture(scope="module", params=["first", pytest.param("second", marks=pytest.mark.slow)])
def searched(request, tmp_path_factory):
    """A short search (2 warmup + 4 alternating steps), discretization, 4 fine-tuning steps.

    Run with first-order architecture steps (the default) and second-order ones (a virtual
    weight step that must be undone exactly).
    """
    out = tmp_path_factory.mktemp(f"searched_{request.param}")
    cfg = compose_config(
        [
            f"dam.arch_grad={request.param}",
            "+experiment=smoke",
            f"train.max_steps={MAX_STEPS}",
            f"dam.search_steps={SEARCH_STEPS}",
            f"dam.warmup_steps={WARMUP}",
            "train.val_every=3",  # validation runs in the middle of the search
            "dam.tau=2.0",
            "dam.tau_end=0.5",
        ],
        out,
    )
    wired = wire(cfg, RecordingModule)
    frozen_before = {
        n: (p, p.detach().clone())
        for n, p in wired.module.named_parameters()
        if not p.requires_grad and n != "dam.logits"
    }
    snaps = StepSnapshots()
    fit(wired, out, [Discretization(out, "tiny_deberta"), snaps])
    return wired, snaps, frozen_before, out


# ------------------------------------------------------------------------ optimizer structure


def test_weight_and_architecture_parameter_sets_are_disjoint(smoke_cfg):
    module = wire(smoke_cfg()).module
    weights = module.configure_optimizers()
    weight_ids = {id(p) for group in weights.param_groups for p in group["params"]}
    arch_params = [p for group in module.arch_optimizer.param_groups for p in group["params"]]
    assert arch_params == [module.dam.logits]
    assert id(module.dam.logits) not in weight_ids
    trainable = {name: p for name, p in module.model.named_parameters() if p.requires_grad}
    assert weight_ids == {id(p) for p in trainable.values()}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    decay = {id(p) for p in weights.param_groups[0]["params"]}
    for name, param in trainable.items():
        if name.endswith("lora_A.default.weight") or name.endswith("lora_B.default.weight"):
            assert id(param) in decay, name
        if name.endswith(".bias"):
            assert id(param) not in decay, name
    assert weights.param_groups[1]["weight_decay"] == 0.0
    arch_group = module.arch_optimizer.param_groups[0]
    assert isinstance(module.arch_optimizer, torch.optim.Adam)
    assert tuple(arch_group["betas"]) == (0.5, 0.999)
    assert arch_group["weight_decay"] == 0.0
    assert arch_group["lr"] == pytest.approx(float(smoke_cfg().dam.arch_lr))
    assert "dam.logits" in module.state_dict()


# ---------------------------------------------------------------------- weight and arch steps


def test_warmup_steps_are_weight_only(searched):
    wired, snaps, _, _ = searched
    assert [r["step"] for r in wired.module.arch_records] == list(range(WARMUP, SEARCH_STEPS))
    for step in range(WARMUP):
        moved = changed(snaps.start[step], snaps.end[step])
        assert "dam.logits" not in moved
        assert any(".lora_B." in n for n in moved)


def test_weight_steps_never_change_gate_logits(searched):
    wired, snaps, _, _ = searched
    trainable = {f"model.{n}" for n, p in wired.module.model.named_parameters() if p.requires_grad}
    for record in wired.module.arch_records:
        # From the start of the batch to just before the architecture step: the weight step.
        moved = changed(snaps.start[record["step"]], record["before"])
        assert "dam.logits" not in moved
        # Nor leave a train-loss gradient on them for the architecture step to apply.
        assert record["leaked"] is None or not record["leaked"].any()
        assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved)
        assert any(".classifier." in n for n in moved)
        assert moved <= trainable | {n for n in moved if ".lora_" in n}


def test_architecture_steps_change_only_gate_logits(searched):
    wired, _, _, _ = searched
    assert wired.module.arch_records
    for record in wired.module.arch_records:
        assert changed(record["before"], record["after"]) == {"dam.logits"}
        # The search loss leaves no gradient on the weights for the next weight step.
        assert record["grads"] == []


def test_fine_tuning_steps_leave_logits_and_dropped_modules_alone(searched):
    wired, snaps, _, _ = searched
    module = wired.module
    assert module.phase == "finetune" and module.step == MAX_STEPS
    assert not module.dam.logits.requires_grad
    final_logits = module.dam.logits.detach()
    for step in range(SEARCH_STEPS, MAX_STEPS):
        assert snaps.phase[step] == "finetune"
        moved = changed(snaps.start[step], snaps.end[step])
        assert "dam.logits" not in moved
        assert any(".lora_B." in n for n in moved)
    assert torch.equal(snaps.start[SEARCH_STEPS]["dam.logits"], final_logits)


def test_backbone_weights_stay_frozen(searched):
    wired, _, frozen_before, _ = searched
    now = {id(p) for p in wired.module.parameters()}
    assert len(frozen_before) > 20
    for name, (param, before) in frozen_before.items():
        # Dropped modules' base weights move up a level (no more ``base_layer``): same tensor.
        assert id(param) in now, name
        assert not param.requires_grad, name
        assert torch.equal(param.detach(), before), name


def test_training_steps_run_in_train_mode(searched):
    wired, _, _, _ = searched
    modes = wired.module.modes
    assert len(modes) == MAX_STEPS
    # Every step, including those after a validation (steps 3, 6, 9) and after the
    # discretization's before/after evaluations (step 6), has dropout on.
    assert [m[0] for m in modes] == list(range(MAX_STEPS))
    assert all(all_training for _, _, all_training in modes), modes
    assert {phase for _, phase, _ in modes} == {"search", "finetune"}


# ------------------------------------------------------------------------------ discretization


def test_discretization_keeps_top_k_of_the_final_gates(searched):
    wired, _, _, out = searched
    module = wired.module
    mask = module.mask
    assert mask.step == SEARCH_STEPS and mask.k == sum(mask.kept)
    # The budget in parameters: within half the largest module of half of all adapters.
    sizes = [c.lora_params(8) for c in module.candidates]
    achieved = sum(s for s, keep in zip(sizes, mask.kept) if keep)
    assert (mask.unit, mask.target) == ("params", 0.5 * sum(sizes))
    assert abs(achieved - mask.target) <= max(sizes) / 2
    # tau anneals linearly from 2.0 at step 0 to 0.5 at step SEARCH_STEPS - 1 (the fixture's
    # settings); the mask is taken at step SEARCH_STEPS, past the end: tau = 0.5.
    # Modules the default (progressive) search removed before the cut have gate 0.
    logits, active = module.dam.logits.detach().flatten(), module.dam.active.flatten()
    assert active.tolist() == mask.kept
    assert mask.gates == pytest.approx((torch.sigmoid(logits / 0.5) * active).tolist(), abs=1e-6)
    assert mask.gates != pytest.approx((torch.sigmoid(logits / 2.0) * active).tolist(), abs=1e-3)
    kept = [g for g, k in zip(mask.gates, mask.kept) if k]
    dropped = [g for g, k in zip(mask.gates, mask.kept) if not k]
    assert min(kept) >= max(dropped)
    assert mask.modules == [c.name for c in module.candidates]
    assert (out / "dam" / "mask.json").is_file()


def test_optimizer_after_discretization_holds_only_kept_adapters(searched):
    wired, _, _, _ = searched
    module = wired.module
    optimizer = module.trainer.strategy.optimizers[0]
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert params == {id(p) for p in trainable}
    assert sum(p.numel() for p in trainable) == module.trainable_parameters()["total"]
    assert set(map(id, optimizer.state)) <= params
    kept = set(module.mask.kept_modules)
    lora_owners = {
        n.split(".lora_")[0].removeprefix("base_model.model.")
        for n, p in module.model.named_parameters()
        if ".lora_" in n
    }
    assert lora_owners == kept
    assert module.arch_optimizer is None and module.lora_gates is None


class CaptureLogits(pl.Callback):
    """Dev logits at the end of the search step, just before or just after discretization."""

    def __init__(self, when: str, budget: float) -> None:
        self.when = when
        self.budget = budget
        self.logits: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.step != module.search.steps:
            return
        dev = next(iter(trainer.datamodule.val_dataloader()[0]))
        dev.pop("labels")
        module.model.eval()
        with torch.no_grad():
            if self.when == "before":
                assert module.searching
                self.logits["gated"] = module(dev).logits
                gates = module.current_gates()
                keep = module.variant.budget.keep(gates)
                module.lora_gates.set(gates * keep)
                self.logits["kept_only"] = module.model(**dev).logits
            else:
                assert not module.searching
                self.logits["after"] = module(dev).logits
        module.model.train()


@pytest.mark.parametrize(
    ("budget", "search"),
    [
        pytest.param(1.0, "faithful", marks=pytest.mark.slow),
        (0.5, "faithful"),
        pytest.param(0.5, "softmax_row", marks=pytest.mark.slow),
    ],
)
def test_discretization_preserves_each_kept_module_function(tmp_path, budget, search):
    cfg = compose_config(
        [
            "+experiment=smoke",
            # The paper's search: dropped modules still contribute before the cut (the default
            # search has removed them by then, tests/test_search_variants.py).
            f"search={search}",
            f"budget={budget}",
            "train.max_steps=7",
            "dam.search_steps=6",
            "dam.warmup_steps=2",
        ],
        tmp_path,
    )
    wired = wire(cfg)
    before, after = CaptureLogits("before", budget), CaptureLogits("after", budget)
    fit(wired, tmp_path, [before, Discretization(tmp_path, "tiny_deberta"), after])
    gated, kept_only = before.logits["gated"], before.logits["kept_only"]
    torch.testing.assert_close(after.logits["after"], kept_only, atol=1e-5, rtol=0)
    disc = wired.module.discretization
    if budget == 1.0:
        torch.testing.assert_close(after.logits["after"], gated, atol=1e-5, rtol=0)
        assert disc["before"] == disc["after"]
    else:
        # The dropped modules did contribute, so the check above is not vacuous.
        assert (gated - kept_only).abs().max() > 1e-5
    assert disc["step"] == 6 and disc["val_before"] is not None


# ------------------------------------------------------------------------------------ batches


def rows(batch) -> list[tuple[int, ...]]:
    return [
        tuple(ids[mask.bool()].tolist())
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]


class BatchRecorder(TrainingModule):
    """Records the examples of every weight-step and architecture-step batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_rows: list[tuple[str, tuple[int, ...]]] = []
        self.search_rows: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):
        self.train_rows += [(self.phase, row) for row in rows(batch)]
        return super().training_step(batch, batch_idx)

    def _next_search_batch(self):
        batch = super()._next_search_batch()
        self.search_rows += rows(batch)
        return batch


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """4 search steps, then 8 fine-tuning steps with ``dam.merge_search_split=true``."""
    out = tmp_path_factory.mktemp("merged")
    cfg = compose_config(
        [
            "+experiment=smoke",
            "train.max_steps=12",
            "dam.search_steps=4",
            "dam.warmup_steps=2",
            "dam.merge_search_split=true",
        ],
        out,
    )
    wired = wire(cfg, BatchRecorder)
    data = wired.datamodule
    splits = {
        "train": {tuple(data.train.columns["input_ids"][i]) for i in data.train_indices},
        "search": set(map(tuple, data.search.columns["input_ids"])),
        "dev": {tuple(r) for split in data.dev.values() for r in split.columns["input_ids"]},
    }
    fit(wired, out, [Discretization(out, "tiny_deberta")])
    return wired.module, splits


def test_search_split_is_carved_from_train_and_used_only_for_architecture_steps(merged):
    module, splits = merged
    assert len(splits["search"]) == 80 and len(splits["train"]) == 320  # 0.2 of 400 examples
    assert not splits["search"] & splits["train"] and not splits["dev"] & splits["train"]
    assert not splits["dev"] & splits["search"]
    searching = [row for phase, row in module.train_rows if phase == "search"]
    assert len(searching) == 4 * 16
    assert set(searching) <= splits["train"]
    assert len(module.search_rows) == 2 * 16  # steps 2 and 3
    assert set(module.search_rows) <= splits["search"]


def test_merge_search_split_fine_tunes_on_search_examples_too(merged):
    module, splits = merged
    finetuning = [row for phase, row in module.train_rows if phase == "finetune"]
    assert len(finetuning) == 8 * 16
    assert set(finetuning) <= splits["train"] | splits["search"]
    # 128 draws from 400 examples, 80 of them from the search split.
    assert set(finetuning) & splits["search"]
