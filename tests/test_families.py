"""The backbone family table: candidates of every family on weightless (meta) models built from
tiny configs, real in/out sizes (grouped-query attention), both model classes, the refusal of an
unknown family, and the module groups the fixed-choice baselines use."""

from __future__ import annotations

import pytest
import torch
import transformers

from diffora_lab import families
from diffora_lab.backbones import find_candidates
from diffora_lab.matching import lora_params

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "vocab_size": 256,
}
DECODERS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3"]


def meta_model(model_type: str, auto, **extra):
    settings = dict(TINY, **extra)
    if model_type in DECODERS:
        settings.update(
            num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
    config = transformers.AutoConfig.for_model(model_type, **settings)
    with torch.device("meta"):
        return auto.from_config(config)


def candidates_of(model, model_type: str):
    family = families.family_for(model_type)
    pattern = families.layer_pattern(family, model)
    return find_candidates(model, pattern, dict(family.modules))


@pytest.mark.parametrize("model_type", DECODERS)
@pytest.mark.parametrize(
    "auto", [transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification]
)
def test_decoder_families_find_every_module_with_its_real_size(model_type, auto):
    model = meta_model(model_type, auto)
    found = candidates_of(model, model_type)
    family = families.FAMILIES[model_type]
    assert family.causal_lm
    assert len(found) == 2 * len(family.modules)
    assert all(c.name.startswith("model.layers.") for c in found)
    sizes = {c.module_type: (c.d_in, c.d_out) for c in found if c.layer == 0}
    head_dim = 64 // 4
    if model_type == "phi3":  # fused projections
        assert sizes == {
            "qkv": (64, (4 + 2 * 2) * head_dim),
            "o": (64, 64),
            "gate_up": (64, 192),
            "down": (96, 64),
        }
    else:
        # Grouped-query attention: k and v project to 2 KV heads, half of q.
        assert sizes["k"] == sizes["v"] == (64, 2 * head_dim)
        assert sizes["q"][1] == 4 * head_dim and sizes["gate"] == sizes["up"] == (64, 96)
    # Parameter counts use those sizes, not hidden x hidden.
    assert lora_params(found, 8) == sum(8 * (d_in + d_out) for d_in, d_out in sizes.values()) * 2


@pytest.mark.parametrize(
    ("model_type", "prefix", "heads"),
    [
        ("bert", "bert.encoder.layer.", ("classifier", "pooler")),
        ("roberta", "roberta.encoder.layer.", ("classifier",)),
        ("deberta-v2", "deberta.encoder.layer.", ("classifier", "pooler")),
    ],
)
def test_encoder_rows_match_the_backbone_yamls(model_type, prefix, heads):
    model = meta_model(model_type, transformers.AutoModelForSequenceClassification)
    family = families.FAMILIES[model_type]
    assert not family.causal_lm and family.head_modules == heads
    assert families.layer_pattern(family, model) == prefix.replace(".", r"\.") + r"(\d+)\."
    assert [c.module_type for c in candidates_of(model, model_type)[:6]] == list(family.modules)


def test_an_unknown_family_lists_the_linear_layers():
    model = meta_model("olmo", transformers.AutoModelForCausalLM, num_key_value_heads=2)
    with pytest.raises(
        ValueError, match="model_type='olmo' is not in the backbone family table"
    ) as refused:
        families.family_for("olmo", model)
    message = str(refused.value)
    assert (
        "model.layers.N.self_attn.q_proj" in message and "model.layers.N.mlp.down_proj" in message
    )
    assert "src/diffora_lab/families.py" in message


def test_module_groups():
    llama, phi3 = families.FAMILIES["llama"], families.FAMILIES["phi3"]
    assert families.group_types(llama, "mlp") == ["gate", "up", "down"]
    assert families.group_types(llama, "peft_default") == ["q", "v"]
    assert families.group_types(phi3, "attention") == ["qkv", "o"]
    assert families.group_types(families.FAMILIES["bert"], "mlp") == ["ffn_in", "ffn_out"]
    with pytest.raises(ValueError, match="module group 'heads'"):
        families.group_types(llama, "heads")
    with pytest.raises(ValueError, match="needs module types"):
        families.group_types(llama, "mlp", module_types=["q", "k", "v", "o"])
