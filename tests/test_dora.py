"""``method=dora``: peft's DoRA added as one method file; trained, matched, exported like LoRA."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from peft import PeftModel

from diffora_lab import backbones, methods, train
from diffora_lab.evaluate import evaluate
from diffora_lab.matching import grid_candidates

STEPS = 12


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dora")
    cfg = compose_config(
        [
            "+experiment=smoke",
            "logger=none",
            "method=dora",
            "rank=4",
            f"train.max_steps={STEPS}",
            "train.lr=0.05",
        ],
        tmp,
    )
    captured: dict[str, Any] = {}
    real_build = methods.build

    def build(cfg, backbone, candidates, *args):
        built = real_build(cfg, backbone, candidates, *args)
        before = {k: v.detach().clone() for k, v in built.model.state_dict().items()}
        captured.update(model=built.model, candidates=candidates, before=before)
        return built

    out = tmp / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(methods, "build", build)
        results = train.run(cfg, out)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return {"cfg": cfg, "out": out, "results": results, **captured}


@pytest.mark.slow
def test_dora_trains_magnitudes_directions_and_head_only(dora_run):
    model = dora_run["model"]
    after = model.state_dict()
    changed = {k for k, v in dora_run["before"].items() if not torch.equal(v, after[k])}
    assert any("lora_magnitude_vector" in k for k in changed)
    assert any("lora_B" in k for k in changed)
    assert any(".modules_to_save." in k for k in changed)
    frozen_moved = {k for k in changed if "lora_" not in k and ".modules_to_save." not in k}
    assert not frozen_moved, sorted(frozen_moved)[:5]
    # Every candidate carries a magnitude vector of its output size: DoRA, not plain LoRA.
    base = model.base_model.model
    for cand in dora_run["candidates"]:
        layer = base.get_submodule(cand.name)
        assert layer.lora_magnitude_vector["default"].weight.shape == (cand.d_out,)


@pytest.mark.slow
def test_dora_reports_its_adapter_parameters(dora_run):
    results = dora_run["results"]
    assert results["method"] == "dora" and results["steps"] == STEPS
    candidates = dora_run["candidates"]
    # r (d_in + d_out) for A and B plus d_out for the magnitude, per candidate module.
    expected = sum(4 * (c.d_in + c.d_out) + c.d_out for c in candidates)
    assert results["params"]["adapter"] == expected
    assert results["k"] == len(candidates) == results["candidate_modules"]


@pytest.mark.slow
def test_dora_adapter_reloads_with_peft_and_reproduces_logits(dora_run):
    cfg, out = dora_run["cfg"], dora_run["out"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
    tokenizer = backbones.load_tokenizer(cfg.backbone)
    inputs = dict(
        tokenizer(["a fine film", "never again", "so so"], padding=True, return_tensors="pt")
    )
    trained = dora_run["model"].eval()
    base = backbones.load_backbone(cfg.backbone, 2, vocab_size=len(tokenizer))
    loaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5, rtol=0)
        untrained = backbones.load_backbone(cfg.backbone, 2, vocab_size=len(tokenizer)).eval()
        assert not torch.allclose(untrained(**inputs).logits, expected, atol=1e-3)
    # The scoring CLI reproduces the run's final dev metrics from the adapter folder.
    assert evaluate(out / "adapter") == dora_run["results"]["metrics"]


def test_dora_is_matched_like_lora():
    candidates = grid_candidates(2, 32, 64)
    cfg = OmegaConf.create(
        {"rank": 3, "budget": 0.5, "method": {"name": "dora"}, "match": {"target_rank": 8}}
    )
    assert methods.resolve_rank(cfg, candidates) == 8
    assert methods.get_method("dora").uses_budget is False
    assert methods.get_method("dora").exports_adapter is True
