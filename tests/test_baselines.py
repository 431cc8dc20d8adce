"""Every method trains on the smoke experiment and moves only the parameters it should."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_config
from omegaconf import DictConfig
from peft.tuners.adalora import AdaLoraModel
from peft.tuners.lora import LoraLayer

from diffora_lab import backbones, methods, train
from diffora_lab.backbones import Candidate
from diffora_lab.dam import Mask, num_kept
from diffora_lab.methods import Built
from diffora_lab.methods.adalora import (
    allocator_state,
    attach_adalora,
    load_allocator_state,
    rank_summary,
)
from diffora_lab.methods.random_mask import random_mask as draw_random_mask

STEPS = 10
HEAD = ("classifier.", "pooler.")


@dataclass
class Trained:
    cfg: DictConfig
    out: Path
    built: Built
    candidates: list[Candidate]
    before: dict[str, torch.Tensor]
    results: dict[str, Any]

    @property
    def changed(self) -> set[str]:
        after = snapshot(self.built.model)
        return {k for k, v in self.before.items() if k in after and not torch.equal(v, after[k])}


def _key(name: str) -> str:
    # peft's wrapping, and DiffoRA putting dropped modules' plain Linear back, rename weights.
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_key(k): v.detach().clone() for k, v in model.state_dict().items()}


def run_method(tmp_path: Path, monkeypatch, method: str, *overrides: str) -> Trained:
    cfg = compose_config(
        [
            "+experiment=smoke",
            "logger=none",
            f"method={method}",
            f"train.max_steps={STEPS}",
            "dam.warmup_steps=2",
            "dam.log_every=100",
            *overrides,
        ],
        tmp_path,
    )
    captured: dict[str, Any] = {}
    real_build = methods.build

    def build(cfg, backbone, candidates, *args):
        built = real_build(cfg, backbone, candidates, *args)
        captured.update(built=built, candidates=candidates, before=snapshot(built.model))
        return built

    monkeypatch.setattr(methods, "build", build)
    out = tmp_path / "run"
    results = train.run(cfg, out)
    return Trained(cfg, out, results=results, **captured)


def is_head(key: str) -> bool:
    return key.startswith(HEAD)


def check_adapter_only(trained: Trained) -> None:
    changed = trained.changed
    assert changed, "nothing trained"
    outside = {k for k in changed if "lora_" not in k and ".modules_to_save." not in k}
    assert not outside, f"frozen parameters moved: {sorted(outside)[:5]}"
    assert any("lora_B" in k for k in changed)
    assert any(is_head(k) and ".modules_to_save." in k for k in changed)
    assert not any(".original_module." in k for k in changed)


def adapted_modules(trained: Trained) -> set[str]:
    base = trained.built.model.base_model.model
    return {c.name for c in trained.candidates if isinstance(base.get_submodule(c.name), LoraLayer)}


@pytest.mark.slow
def test_full_trains_the_backbone(tmp_path, monkeypatch):
    trained = run_method(tmp_path, monkeypatch, "full")
    changed = trained.changed
    assert "deberta.encoder.layer.0.attention.self.query_proj.weight" in changed
    assert "deberta.encoder.layer.1.output.dense.weight" in changed
    assert "classifier.weight" in changed
    assert trained.results["params"]["total"] == sum(
        p.numel() for p in trained.built.model.parameters()
    )
    # A run without adapter/ is scored from its checkpoint, with the config stored there, and
    # a full model "merged" is the model itself.
    from diffora_lab.evaluate import evaluate
    from diffora_lab.export import export_merged

    assert evaluate(trained.out) == trained.results["metrics"]
    export_merged(trained.built.model, trained.out / "merged")
    assert evaluate(trained.out / "merged") == trained.results["metrics"]


def test_bitfit_trains_biases_and_head(tmp_path, monkeypatch):
    trained = run_method(tmp_path, monkeypatch, "bitfit")
    changed = trained.changed
    outside = {k for k in changed if not (k.endswith(".bias") or is_head(k))}
    assert not outside, sorted(outside)[:5]
    assert "deberta.encoder.layer.0.attention.self.query_proj.bias" in changed
    assert "classifier.weight" in changed
    assert "deberta.encoder.layer.0.attention.self.query_proj.weight" not in changed


@pytest.mark.slow
def test_lora_trains_adapters_and_head(tmp_path, monkeypatch):
    trained = run_method(tmp_path, monkeypatch, "lora")
    check_adapter_only(trained)
    assert adapted_modules(trained) == {c.name for c in trained.candidates}


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["params", "modules"])
def test_random_mask_keeps_the_budgets_count(tmp_path, monkeypatch, unit):
    trained = run_method(tmp_path, monkeypatch, "random_mask", "budget=0.5", f"budget_unit={unit}")
    check_adapter_only(trained)
    mask = Mask.load(trained.out / "dam" / "mask.json")
    assert mask.k == len(mask.kept_modules) and mask.unit == unit
    if unit == "modules":
        assert mask.k == num_kept(0.5, len(trained.candidates))
    else:
        sizes = [c.lora_params(8) for c in trained.candidates]
        kept = sum(s for s, keep in zip(sizes, mask.kept) if keep)
        assert mask.target == 0.5 * sum(sizes) and abs(kept - mask.target) <= max(sizes) / 2
    assert adapted_modules(trained) == set(mask.kept_modules)


def test_random_masks_differ_across_seeds():
    cfg = compose_config(["+experiment=smoke"])
    model = backbones.load_backbone(cfg.backbone, 2, vocab_size=1000)
    candidates = backbones.find_candidates(
        model, cfg.backbone.layer_pattern, dict(cfg.backbone.module_types)
    )
    types = list(cfg.backbone.module_types)
    masks = [
        draw_random_mask(candidates, types, 0.5, seed, "tiny_deberta").kept for seed in range(4)
    ]
    assert all(sum(m) == num_kept(0.5, len(candidates)) for m in masks)
    assert len({tuple(m) for m in masks}) > 1
    again = draw_random_mask(candidates, types, 0.5, 0, "tiny_deberta").kept
    assert again == masks[0]


@pytest.mark.slow
def test_diffora_trains_kept_adapters_only(tmp_path, monkeypatch):
    trained = run_method(tmp_path, monkeypatch, "diffora", "budget=0.5")
    check_adapter_only(trained)
    mask = Mask.load(trained.out / "dam" / "mask.json")
    assert mask.source == "search" and mask.k == len(mask.kept_modules)
    assert trained.results["budget_count"]["within_one_module"] is True
    assert adapted_modules(trained) == set(mask.kept_modules)


@pytest.mark.slow
def test_adalora_allocates_every_step_within_budget(tmp_path, monkeypatch):
    steps: list[int] = []
    real = AdaLoraModel.update_and_allocate

    def record(self, global_step):
        steps.append(global_step)
        return real(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", record)
    trained = run_method(tmp_path, monkeypatch, "adalora", "rank=4")
    assert steps == list(range(STEPS))
    check_adapter_only(trained)
    model = trained.built.model
    config = model.peft_config["default"]
    assert (config.target_r, config.init_r, config.total_step) == (4, 6, STEPS)
    summary = rank_summary(model, trained.candidates)
    assert summary["allocated"]
    assert summary["budget"] == 4 * len(trained.candidates)
    assert 0 < summary["total_rank"] <= summary["budget"]
    # The pruned singular values are zero in the final weights.
    for name, param in model.base_model.model.named_parameters():
        if "lora_E" in name:
            module = name.replace(".lora_E.default", "")
            assert int((param != 0).sum()) == summary["ranks"][module]
    json.dumps(summary)  # reportable as is
    # A resumed run gets the allocator back (the rank pattern is not in the state dict).
    state = allocator_state(model)
    assert state["rank_pattern"] == config.rank_pattern
    fresh = run_components(trained.cfg)
    assert fresh.peft_config["default"].rank_pattern is None
    load_allocator_state(fresh, state)
    fresh.base_model.update_and_allocate(STEPS - 1)  # final phase: applies the saved pattern
    assert rank_summary(fresh, trained.candidates)["ranks"] == summary["ranks"]


def run_components(cfg: DictConfig):
    """A fresh AdaLoRA model for ``cfg`` (no training)."""
    model = backbones.load_backbone(cfg.backbone, 2, vocab_size=1000)
    candidates = backbones.find_candidates(
        model, cfg.backbone.layer_pattern, dict(cfg.backbone.module_types)
    )
    return attach_adalora(cfg, model, candidates)


def test_adalora_loss_includes_the_configured_orthogonal_regularizer():
    # What the harness relies on (not peft's formula): method.orth_reg_weight reaches the
    # training loss, in proportion, and only when labels are given.
    batch = {
        "input_ids": torch.randint(5, 1000, (4, 12), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    losses, logits = {}, {}
    for weight in (0.1, 0.2, 0.3):  # peft < 0.20 refuses a weight of 0
        cfg = compose_config(
            ["+experiment=smoke", "method=adalora", f"method.orth_reg_weight={weight}"]
        )
        torch.manual_seed(0)  # the same initial adapters for every weight
        model = run_components(cfg).eval()
        with torch.no_grad():
            losses[weight] = float(model(**batch).loss)
            unlabelled = {k: v for k, v in batch.items() if k != "labels"}
            logits[weight] = model(**unlabelled).logits
    first, second = losses[0.2] - losses[0.1], losses[0.3] - losses[0.1]
    assert first > 1e-4
    assert second == pytest.approx(2 * first, rel=1e-4)
    torch.testing.assert_close(logits[0.3], logits[0.1], atol=0, rtol=0)
