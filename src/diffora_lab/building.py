"""What a run builds from its config: first resolved on a weightless model, then loaded.

:func:`resolve` runs inside ``train.prepare`` (before any weights load): it reads the backbone's
config, finds its family (:mod:`diffora_lab.families`), picks the task kind
(:mod:`diffora_lab.tasks.kinds`), finds the candidate modules on a meta-device copy of the model
the kind will load, and writes what it resolved into the config (``backbone.family``,
``backbone.layer_pattern``, ``backbone.module_types``, ``backbone.head_modules``, ``task.kind``),
so every later reader (methods, checkpoints, ``results.json``) sees the same values.
:func:`load_model` loads the real weights afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from diffora_lab import backbones, families
from diffora_lab.backbones import Candidate
from diffora_lab.families import Family
from diffora_lab.scoring import model_max_length
from diffora_lab.tasks import TaskSpec
from diffora_lab.tasks.kinds import TaskKind, get_kind, resolve_kind_name


@dataclass
class Resolved:
    """The backbone's family, the run's task kind and the DAM's candidate modules."""

    family: Family
    kind: TaskKind
    candidates: list[Candidate]
    positions: int | None = None  # the model's positions (bounds task.max_length)


def _meta(config, auto) -> nn.Module:
    with torch.device("meta"):
        return auto.from_config(config)


def _family(bcfg: DictConfig, config) -> Family:
    import transformers

    if config.model_type in families.FAMILIES:
        return families.FAMILIES[config.model_type]
    model = _meta(config, transformers.AutoModel)
    return families.family_for(config.model_type, model, f"backbone={bcfg.name}: ")


def _kind(cfg: DictConfig, spec: TaskSpec, family: Family) -> TaskKind:
    name = resolve_kind_name(cfg.task.get("kind"), spec, family.causal_lm, str(cfg.backbone.name))
    options = OmegaConf.to_container(cfg.task, resolve=True)
    return get_kind(name)(spec, options)


def _check_checkpointing(cfg: DictConfig, model: nn.Module, family: Family) -> None:
    setting = cfg.train.get("gradient_checkpointing", False)
    if not isinstance(setting, bool):
        raise ValueError(f"train.gradient_checkpointing={setting!r}: true or false.")
    if setting and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing=true: {type(model).__name__} ({family.model_type}) does "
            "not support gradient checkpointing in transformers; set "
            "train.gradient_checkpointing=false (or lower train.batch_size / task.max_length)."
        )


def _candidates(bcfg: DictConfig, family: Family, model: nn.Module) -> tuple[str, dict, list]:
    pattern = bcfg.get("layer_pattern") or families.layer_pattern(family, model)
    module_types = dict(bcfg.module_types) if bcfg.get("module_types") else dict(family.modules)
    return str(pattern), module_types, backbones.find_candidates(model, str(pattern), module_types)


def resolve(cfg: DictConfig, spec: TaskSpec, tokenizer) -> Resolved:
    """Family, task kind and candidates, from the backbone's config alone (no weights).

    Raises:
        ValueError: A family the table lacks (listing the model's Linear layers), a causal-LM
            task on an encoder-only backbone, a kind the task does not support, a bad
            ``backbone.dtype``, ``train.gradient_checkpointing`` on a model without support,
            or the kind's own settings (answer words that tokenize to nothing, ...).
    """
    import transformers

    bcfg = cfg.backbone
    config = backbones.load_config(bcfg, len(tokenizer))
    family = _family(bcfg, config)
    kind = _kind(cfg, spec, family)
    backbones.model_dtype(bcfg, kind.causal_lm)  # a bad backbone.dtype fails here
    if kind.causal_lm:
        model = _meta(config, transformers.AutoModelForCausalLM)
    else:
        config.num_labels = max(spec.num_labels, 1)
        model = _meta(config, transformers.AutoModelForSequenceClassification)
    pattern, module_types, candidates = _candidates(bcfg, family, model)
    override = list(bcfg.head_modules) if bcfg.get("head_modules") is not None else None
    heads = kind.head_modules(family.head_modules, override)
    _check_checkpointing(cfg, model, family)
    if kind.causal_lm and not kind.options.get("eval_max_length"):
        kind.options["eval_max_length"] = model_max_length(model, tokenizer)
    kind.check(tokenizer)
    with open_dict(cfg):
        bcfg.family = family.model_type
        bcfg.layer_pattern = pattern
        bcfg.module_types = module_types
        bcfg.head_modules = heads
        cfg.task.kind = kind.name
    positions = getattr(model.config, "max_position_embeddings", None)
    return Resolved(family, kind, candidates, positions)


def load_model(cfg: DictConfig, resolved: Resolved, tokenizer) -> nn.Module:
    """The backbone with the kind's head, weights loaded, gradient checkpointing as configured.

    Gradient checkpointing is non-reentrant: the DAM gates (in peft's LoRA scaling or a hook on
    ``lora_A``) take part in the recomputed forward exactly as in the first one.
    """
    pad = tokenizer.pad_token_id if resolved.family.causal_lm else None
    model = resolved.kind.load_model(cfg.backbone, len(tokenizer), pad)
    if cfg.train.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
