"""Backbone families: where a model's layers are and what its candidate modules are called.

One row per ``model_type`` (the field of a checkpoint's ``config.json``): the layer container,
the DAM's candidate modules by short type (METHOD.md, "Objects"), whether the family can do causal
LM or is encoder-only, the classification head a ``*ForSequenceClassification`` model adds, and
groups of module types (what the fixed-choice baselines select). A new checkpoint of a known
family needs only a backbone YAML naming its source; a new family is a new row here.

Names are matched by suffix: the layer container ``model.layers`` finds ``model.layers.3.`` in
``LlamaForCausalLM`` and in ``LlamaForSequenceClassification`` alike, and inside a peft wrapper.
A backbone YAML may still override ``layer_pattern`` / ``module_types`` / ``head_modules``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

_DECODER_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_DECODER_GROUPS = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "peft_default": ("q", "v"),  # peft's default target modules for these model types
}
_BERT_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
_ENCODER_GROUPS = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("ffn_in", "ffn_out"),
    "peft_default": ("q", "v"),
}


@dataclass(frozen=True)
class Family:
    """One row of the family table.

    Attributes:
        model_type: The ``config.model_type`` this row describes.
        layers: Dotted path of the layer container (``model.layers``), matched as a suffix.
        modules: Short module type -> dotted path inside a layer, in DAM column order.
        causal_lm: Loads as ``AutoModelForCausalLM`` (decoder); False: encoder-only.
        head_modules: Modules a ``*ForSequenceClassification`` model adds (trained, saved).
        groups: Named sets of module types (``attention``, ``mlp``, ``peft_default``).
    """

    model_type: str
    layers: str
    modules: dict[str, str]
    causal_lm: bool
    head_modules: tuple[str, ...]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def layer_regex(self) -> str:
        """Regex of one layer's prefix with the index as group 1, any prefix before it."""
        return r"(?:.*\.)?" + re.escape(self.layers) + r"\.(\d+)\."


def _decoder(model_type: str) -> Family:
    return Family(model_type, "model.layers", _DECODER_MODULES, True, ("score",), _DECODER_GROUPS)


FAMILIES: dict[str, Family] = {
    row.model_type: row
    for row in (
        _decoder("llama"),
        _decoder("qwen2"),
        _decoder("qwen3"),
        _decoder("mistral"),
        _decoder("gemma"),
        _decoder("gemma2"),
        Family(
            "phi3",
            "model.layers",
            {
                "qkv": "self_attn.qkv_proj",
                "o": "self_attn.o_proj",
                "gate_up": "mlp.gate_up_proj",
                "down": "mlp.down_proj",
            },
            True,
            ("score",),
            {"attention": ("qkv", "o"), "mlp": ("gate_up", "down"), "peft_default": ("qkv",)},
        ),
        # CTRL: a decoder without gradient checkpointing in transformers (the refusal's case).
        Family(
            "ctrl",
            "transformer.h",
            {
                "q": "multi_head_attention.Wq",
                "k": "multi_head_attention.Wk",
                "v": "multi_head_attention.Wv",
                "o": "multi_head_attention.dense",
                "ffn_in": "ffn.0",
                "ffn_out": "ffn.2",
            },
            True,
            ("classifier",),
            _ENCODER_GROUPS,
        ),
        Family(
            "bert", "encoder.layer", _BERT_MODULES, False, ("classifier", "pooler"), _ENCODER_GROUPS
        ),
        Family("roberta", "encoder.layer", _BERT_MODULES, False, ("classifier",), _ENCODER_GROUPS),
        Family(
            "deberta-v2",
            "encoder.layer",
            {
                "q": "attention.self.query_proj",
                "k": "attention.self.key_proj",
                "v": "attention.self.value_proj",
                "o": "attention.output.dense",
                "ffn_in": "intermediate.dense",
                "ffn_out": "output.dense",
            },
            False,
            ("classifier", "pooler"),
            _ENCODER_GROUPS,
        ),
    )
}
"""The family table, keyed by ``model_type``."""


def linear_names(model: nn.Module) -> list[str]:
    """The model's ``nn.Linear`` names, layer indices shown as ``N`` and listed once."""
    seen = {re.sub(r"\.\d+\.", ".N.", name) for name, m in model.named_modules() if _linear(m)}
    return sorted(seen)


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def family_for(model_type: str, model: nn.Module | None = None, setting: str = "") -> Family:
    """The table's row for ``model_type``.

    Args:
        model_type: ``config.model_type``.
        model: The (meta-device) model, whose Linear layers the error lists.
        setting: How the user chose the backbone (named in the error).

    Raises:
        ValueError: The table lacks the family; lists the model's Linear layers.
    """
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    listed = ", ".join(linear_names(model)) if model is not None else "(not built)"
    raise ValueError(
        f"{setting}model_type={model_type!r} is not in the backbone family table "
        f"(known: {sorted(FAMILIES)}). Add a row for it to src/diffora_lab/families.py (its layer "
        f"container and candidate modules); its nn.Linear layers are: {listed}."
    )


def layer_pattern(family: Family, model: nn.Module) -> str:
    """The concrete layer pattern of ``model`` (e.g. ``model\\.layers\\.(\\d+)\\.``).

    Raises:
        ValueError: No module matches the family's layer container.
    """
    regex = re.compile(family.layer_regex())
    prefixes = {
        match.group(0)[: match.start(1)]
        for name, _ in model.named_modules()
        if (match := regex.fullmatch(name + ".")) is not None
    }
    if len(prefixes) != 1:
        raise ValueError(
            f"backbone: the {family.model_type!r} row's layer container {family.layers!r} "
            f"matches {len(prefixes)} prefixes in {type(model).__name__} ({sorted(prefixes)}); "
            "set backbone.layer_pattern (a regex with one group for the layer index)."
        )
    return re.escape(prefixes.pop()) + r"(\d+)\."


def group_types(family: Family, group: str, module_types: Sequence[str] | None = None) -> list[str]:
    """The module types of ``group`` (``attention``, ``mlp``, ``peft_default``) for a family.

    This is what the fixed-choice baselines (LoRA on q, v only; attention only; MLP only) select:
    ``[c for c in candidates if c.module_type in group_types(family, "mlp")]``.

    Args:
        family: The backbone's family (``family_for(cfg.backbone.family)``).
        group: The group's name.
        module_types: The run's module types (``cfg.backbone.module_types``), when overridden.

    Raises:
        ValueError: An unknown group, or a group whose types the run's module types lack.
    """
    if group not in family.groups:
        raise ValueError(
            f"module group {group!r} is not defined for {family.model_type!r}; "
            f"choose one of {sorted(family.groups)}."
        )
    types = list(family.groups[group])
    if module_types is not None:
        missing = [t for t in types if t not in module_types]
        if missing:
            raise ValueError(
                f"module group {group!r} needs module types {missing}, which "
                f"backbone.module_types ({list(module_types)}) does not have."
            )
    return types
