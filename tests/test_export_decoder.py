"""Export of a causal-LM adapter: a plain peft LoRA folder that vLLM and llama.cpp accept.

A tiny random Llama (grouped-query attention, tied embeddings) is gated with the framework's
``LoraGates``, trained a few steps on the causal-LM loss, cut to half its modules with
``apply_mask`` (gates folded into B) and exported. The folder must reload in peft to the same
logits, merge to the same logits, and hold nothing but the kept modules' LoRA matrices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from diffora_lab.adapters import LoraGates, apply_mask
from diffora_lab.backbones import find_candidates
from diffora_lab.dam import Mask
from diffora_lab.export import SELECTION_FILE, export_adapter, write_selection
from diffora_lab.families import FAMILIES

RANK = 4
ALPHA = 8.0
VOCAB = 96
LAYER_PATTERN = r"model\.layers\.(\d+)\."
MODULE_TYPES = dict(FAMILIES["llama"].modules)  # the family table's decoder row


def tiny_llama(seed: int = 0, vocab: int = VOCAB, **config_extra) -> LlamaForCausalLM:
    """2 layers, 4 query heads over 2 key/value heads, tied embeddings, random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        **config_extra,
    )
    return LlamaForCausalLM(config).eval()


def tokens(seed: int, batch: int = 4, seq: int = 12, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def lora_model(base: LlamaForCausalLM, candidates, **options) -> PeftModel:
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=[c.name for c in candidates],
        task_type="CAUSAL_LM",
        **options,
    )
    return get_peft_model(base, config)


def train_gated(model: PeftModel, candidates, gates: torch.Tensor, steps: int = 4) -> None:
    """Weight steps with detached gates (the search's weight step), causal-LM loss."""
    scaling = LoraGates(model, candidates)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    vocab = model.get_input_embeddings().num_embeddings
    model.train()
    for step in range(steps):
        ids = tokens(100 + step, vocab=vocab)
        scaling.set(gates)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    scaling.remove()


def gated_export(root: Path, tokenizer=None, **config_extra) -> dict:
    """A gated, trained, discretized tiny Llama, its base folder (``root/base``, with the
    tokenizer when given) and its exported adapter (``root/adapter``)."""
    vocab = len(tokenizer) if tokenizer is not None else VOCAB
    tiny_llama(vocab=vocab, **config_extra).save_pretrained(root / "base")
    if tokenizer is not None:
        tokenizer.save_pretrained(root / "base")
    base = tiny_llama(vocab=vocab, **config_extra)
    candidates = find_candidates(base, LAYER_PATTERN, MODULE_TYPES)
    model = lora_model(base, candidates)
    gates = torch.linspace(0.9, 0.1, len(candidates)).view(2, len(MODULE_TYPES))
    train_gated(model, candidates, gates)
    mask = Mask.from_scores(
        gates, [c.name for c in candidates], list(MODULE_TYPES), 0.5, step=4, backbone="tiny"
    )
    apply_mask(model, candidates, mask.kept, gates)
    folder = export_adapter(model, root / "adapter", base_model="diffora_lab backbone=tiny")
    write_selection(folder, mask, {"method": "diffora", "params": {"adapter": 1}})
    return {"root": root, "model": model.eval(), "mask": mask, "folder": folder}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return gated_export(tmp_path_factory.mktemp("decoder_export"))


def test_adapter_config_is_plain_causal_lm_lora(exported):
    config = json.loads((exported["folder"] / "adapter_config.json").read_text())
    mask = exported["mask"]
    assert mask.k == 7
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == sorted(mask.kept_modules)  # explicit full paths
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA  # one global alpha
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["modules_to_save"] is None  # a saved lm_head stops llama.cpp's converter
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["base_model_name_or_path"] == "diffora_lab backbone=tiny"


def test_weights_file_holds_only_the_kept_lora_matrices(exported):
    tensors = load_file(str(exported["folder"] / "adapter_model.safetensors"))
    expected = {
        f"base_model.model.{name}.lora_{part}.weight"
        for name in exported["mask"].kept_modules
        for part in ("A", "B")
    }
    assert set(tensors) == expected  # no gates, no DAM, no embeddings, no lm_head
    down = next(n for n in exported["mask"].kept_modules if n.endswith("down_proj"))
    assert tensors[f"base_model.model.{down}.lora_A.weight"].shape == (RANK, 48)
    assert tensors[f"base_model.model.{down}.lora_B.weight"].shape == (32, RANK)


def test_selection_sidecar_names_what_the_adapter_cannot(exported):
    selection = json.loads((exported["folder"] / SELECTION_FILE).read_text())
    mask = exported["mask"]
    assert selection["kept_modules"] == mask.kept_modules
    assert selection["gates"] == pytest.approx(mask.gates)
    assert selection["budget"] == 0.5 and selection["budget_unit"] == "modules"
    assert selection["k"] == 7 and selection["candidate_modules"] == 14
    assert sum(selection["kept_by_type"].values()) == 7
    assert selection["backbone"] == "tiny" and selection["method"] == "diffora"


def test_reload_and_merge_give_the_trained_logits(exported):
    ids = tokens(7)
    expected = logits(exported["model"], ids)
    base_folder = exported["root"] / "base"
    loaded = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_folder), exported["folder"]
    )
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)
    untrained = logits(LlamaForCausalLM.from_pretrained(base_folder), ids)
    assert not torch.allclose(untrained, expected, atol=1e-3)  # the adapter changes the output
    merged = loaded.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)


def randomize_b(model: PeftModel) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))


def test_rslora_is_folded_into_one_plain_alpha(tmp_path):
    """llama.cpp applies alpha / r and ignores use_rslora: export alpha * sqrt(r) instead."""
    base = tiny_llama()
    candidates = find_candidates(base, LAYER_PATTERN, MODULE_TYPES)
    model = lora_model(base, candidates, use_rslora=True)
    randomize_b(model)
    ids = tokens(8)
    expected = logits(model, ids)
    folder = export_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == pytest.approx(ALPHA * 2)
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)


def test_rank_pattern_lists_only_modules_of_another_rank(tmp_path):
    base = tiny_llama()
    candidates = find_candidates(base, LAYER_PATTERN, MODULE_TYPES)
    odd = candidates[3].name
    model = lora_model(base, candidates, rank_pattern={odd: 2})
    randomize_b(model)
    ids = tokens(9)
    expected = logits(model, ids)
    folder = export_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["rank_pattern"] == {odd: 2}
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)


def test_export_does_not_leave_absolute_paths(exported):
    config_text = (exported["folder"] / "adapter_config.json").read_text()
    assert str(Path(exported["root"]).resolve()) not in config_text
