"""What a user takes away from a run: a plain peft adapter, its selection, its model card.

An adapter folder (``RUN/adapter``) holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``, written by peft's ``save_pretrained``
  and loadable with ``PeftModel.from_pretrained(base, folder)``. ``target_modules`` is the
  explicit list of kept modules (full paths). For causal LMs the config is made portable to the
  serving tools (vLLM, llama.cpp's ``convert_lora_to_gguf.py``): ``task_type`` ``CAUSAL_LM``,
  one global ``lora_alpha`` (rsLoRA's scale folded into it), ``rank_pattern`` only where ranks
  differ, no ``modules_to_save``, only ``lora_A`` / ``lora_B`` tensors;
- ``diffora_selection.json`` (module-selecting methods): the discrete DAM (gates, budget and its
  unit, counts by type, kept modules, backbone), which the adapter itself cannot express;
- ``README.md``: the model card (base model named portably, method, kept modules, dev metrics).

Merged models (adapter folded into the base weights) are written by :func:`export_merged`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from diffora_lab.adapters import ADAPTER, base_of
from diffora_lab.dam import Mask

SELECTION_FILE = "diffora_selection.json"
CARD_FILE = "README.md"


def export_adapter(
    peft_model: PeftModel, folder: str | Path, base_model: str | None = None, **extra: Any
) -> Path:
    """Writes a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``target_modules`` are exactly the kept modules' full paths. For sequence classification the
    head is included through ``modules_to_save``, listed once each and only the modules the model
    has (peft adds its task defaults, ``classifier`` and ``score``, to the configured ones). For
    causal LMs see :func:`portable_causal_lm_config`. Load with
    ``PeftModel.from_pretrained(base, folder)``.

    Args:
        peft_model: The trained model.
        folder: Where to write.
        base_model: What a user loads as the base, written as ``base_model_name_or_path``
            instead of peft's (a local path, possibly inside a virtual environment); see
            :func:`diffora_lab.backbones.model_reference`.
        **extra: Passed to ``save_pretrained``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    causal = str(peft_model.peft_config[ADAPTER].task_type) == "CAUSAL_LM"
    if causal:
        # peft's "auto" may add embedding matrices; a LoRA-only file is what converters expect.
        extra.setdefault("save_embedding_layers", False)
    peft_model.save_pretrained(str(folder), **extra)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if causal and config.get("peft_type") == "LORA":
        config = portable_causal_lm_config(config, lora_ranks(peft_model))
    elif config.get("modules_to_save"):
        names = {name.rsplit(".", 1)[-1] for name, _ in base_of(peft_model).named_modules()}
        config["modules_to_save"] = [
            m for m in dict.fromkeys(config["modules_to_save"]) if m in names
        ]
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def lora_ranks(peft_model: PeftModel) -> dict[str, int]:
    """The rank of every LoRA-wrapped module, by full path in the base model."""
    return {
        name: int(module.r[ADAPTER])
        for name, module in base_of(peft_model).named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.r
    }


def portable_causal_lm_config(config: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """A causal-LM LoRA config that vLLM and llama.cpp read as peft does.

    - ``target_modules``: the sorted full paths of the modules that carry an adapter;
    - ``r``: the most common rank; ``rank_pattern`` lists only modules with another rank;
    - rsLoRA (scale alpha / sqrt(r)) becomes plain LoRA with ``lora_alpha * sqrt(r)`` when all
      ranks are equal: llama.cpp applies alpha / r and ignores ``use_rslora``;
    - no ``modules_to_save``: an extra saved module (an ``lm_head``) stops llama.cpp's converter.

    ``alpha_pattern`` is left as peft wrote it (empty unless set): llama.cpp keeps one alpha.
    """
    out = dict(config)
    if not ranks:
        raise ValueError("the model carries no LoRA adapter to export")
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    common = max(sorted(counts), key=counts.__getitem__)
    out["target_modules"] = sorted(ranks)
    out["r"] = common
    out["rank_pattern"] = {name: r for name, r in sorted(ranks.items()) if r != common}
    if out.get("use_rslora") and len(counts) == 1 and not out.get("alpha_pattern"):
        out["lora_alpha"] = float(out["lora_alpha"]) * math.sqrt(common)
        out["use_rslora"] = False
    out["modules_to_save"] = None
    return out


def write_selection(folder: str | Path, mask: Mask, results: dict[str, Any]) -> Path:
    """Writes ``diffora_selection.json``: the discrete DAM behind the adapter's target modules.

    Every field of the mask (gates, kept flags, budget and, where recorded, its unit and target,
    step, source, backbone), plus the kept modules, the counts by type and the trainable
    parameter counts, so a reader needs neither the run folder nor diffora_lab.
    """
    payload = asdict(mask)
    payload["shape"] = list(mask.shape)
    payload["budget_unit"] = getattr(mask, "unit", None) or results.get("budget_unit", "modules")
    payload["kept_modules"] = mask.kept_modules
    payload["kept_by_type"] = mask.counts_by_type()
    payload["candidate_modules"] = len(mask.modules)
    payload["params"] = results.get("params")
    payload["method"] = results.get("method")
    path = Path(folder) / SELECTION_FILE
    path.write_text(json.dumps(payload, indent=2))
    return path


def export_run(cfg: Any, module: Any, folder: str | Path, results: dict[str, Any]) -> Path | None:
    """Everything a finished run exports into ``folder``; None when its method has no adapter.

    The method writes the adapter (:meth:`Method.export`); a selecting method's mask goes to
    :data:`SELECTION_FILE`; the model card, written last, reads ``results`` (the dev metrics).

    Args:
        cfg: The run's config (``backbone`` names the base model).
        module: The trained :class:`~diffora_lab.module.TrainingModule`.
        folder: The adapter folder (``RUN/adapter``).
        results: The run's results (``results.json``'s content).
    """
    from diffora_lab.backbones import model_reference

    reference = model_reference(cfg.backbone)
    written = module.method.export(module.model, Path(folder), reference)
    if written is None:
        return None
    if module.mask is not None:
        write_selection(written, module.mask, results)
    write_model_card(written, results, cfg.backbone, reference)
    return written


def export_merged(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Writes the model with its adapter merged into the base weights (``save_pretrained``).

    The trained model is left as it is (a copy is merged). Works for LoRA adapters (DiffoRA's
    kept modules, LoRA, random masks) and AdaLoRA (pruned singular values are zero, so they merge
    as nothing); the head (``modules_to_save``) is the trained one. A model without adapters
    (``full``, ``bitfit``) is written as it is.

    Args:
        model: A peft model, or a plain ``transformers`` model.
        folder: Output folder; created if missing.
        tokenizer: Saved alongside when given, so the folder is self-contained.

    Returns:
        The folder; load it with the ``transformers`` auto class of the task (e.g.
        ``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
    plain.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def base_model_name(backbone: Any, reference: str) -> tuple[str, str | None]:
    """``(how the card names the base model, its hub id or None)``, never a machine's path.

    ``reference`` is :func:`diffora_lab.backbones.model_reference`'s: a hub id, a package
    folder, a converted GGUF folder, ``diffora_lab backbone=NAME`` or a path as the user gave
    it; an absolute path is reduced to the folder's name, which is all another machine can use.
    """
    if backbone.get("path"):
        if Path(str(reference)).is_absolute():
            return f"a local model folder named `{Path(str(reference)).name}` (backbone.path)", None
        return f"`{reference}` (backbone.path)", None
    if backbone.get("hub_id"):
        hub_id = str(backbone.get("hub_id"))
        return f"[{hub_id}](https://huggingface.co/{hub_id}) (Hugging Face Hub)", hub_id
    for key in ("package", "gguf"):
        spec = backbone.get(key)
        if spec:
            package = str(spec).split("/", 1)[0].replace("_", "-")
            what = "model folder" if key == "package" else "GGUF file (converted by diffora_lab)"
            return f"`{spec}`, the {what} inside the pip package `{package}`", None
    if Path(str(reference)).is_absolute():
        return f"a local model folder named `{Path(str(reference)).name}`", None
    if backbone.get("config") is not None:
        return (
            f"`{reference}`: random weights from a config with a fixed seed "
            "(`python -m diffora_lab.lm_eval_task RUN` saves them as a folder)",
            None,
        )
    return f"`{reference}`", None


def _card_rows(results: dict[str, Any], config: dict[str, Any]) -> list[str]:
    scaling = results.get("lora_scaling") or {}
    rows = [
        ("method", results.get("method")),
        ("preset", results.get("preset")),
        ("task", results.get("task")),
        ("rank r", config.get("r")),
        ("lora_alpha", config.get("lora_alpha")),
        ("LoRA scale rule", scaling.get("rule")),
        ("budget", results.get("budget") if results.get("k") else None),
        ("budget unit", results.get("budget_unit") if results.get("k") else None),
        ("seed", results.get("seed")),
        ("steps", results.get("steps")),
        ("trainable parameters", f"{results.get('params_trainable', 0):,}"),
        ("adapter parameters", f"{(results.get('params') or {}).get('adapter', 0):,}"),
    ]
    return [f"| {key} | {value} |" for key, value in rows if value not in (None, "")]


def _kept_lines(results: dict[str, Any], config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    if not results.get("kept_by_type"):
        return [f"All {len(targets)} candidate modules carry an adapter (no selection)."]
    lines = [
        f"{results['k']} of {results['candidate_modules']} candidate modules keep an adapter:",
        "",
        "| module type | kept |",
        "|---|---|",
        *(f"| {kind} | {count} |" for kind, count in results["kept_by_type"].items()),
        "",
        f"The full paths are `target_modules` in `adapter_config.json`; the gates and the budget "
        f"are in `{SELECTION_FILE}`.",
    ]
    return lines


def _front_matter(results: dict[str, Any], hub_id: str | None, causal: bool) -> list[str]:
    """The card's YAML header (what the Hub reads): library, base model, pipeline, tags."""
    front = ["---", "library_name: peft"]
    front += [f"base_model: {hub_id}"] if hub_id else []
    front += [f"pipeline_tag: {'text-generation' if causal else 'text-classification'}"]
    return front + ["tags:", "- diffora_lab", "- lora", f"- {results.get('method')}", "---", ""]


def write_model_card(
    folder: str | Path, results: dict[str, Any], backbone: Any, reference: str
) -> Path:
    """Replaces peft's empty card template with what the run knows (README.md of the adapter).

    Written at the end of a run, when ``results`` holds the dev metrics. Names the base model
    portably (:func:`base_model_name`), the method and its settings, the kept modules by type
    and the final dev metrics.
    """
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    causal = config.get("task_type") == "CAUSAL_LM"
    name, hub_id = base_model_name(backbone, reference)
    front = _front_matter(results, hub_id, causal)
    metrics = results.get("metrics") or {}
    auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    labels = "" if causal else f", num_labels={results.get('num_labels')}"
    lines = [
        *front,
        f"# {results.get('method')} adapter for {results.get('backbone')} on {results.get('task')}",
        "",
        "A peft LoRA adapter trained with diffora_lab (DiffoRA, arXiv 2502.08905: a learned gate "
        "per candidate module decides which modules keep an adapter).",
        "",
        f"**Base model:** {name}.",
        "",
        "## Method",
        "",
        "| setting | value |",
        "|---|---|",
        *_card_rows(results, config),
        "",
        "## Kept modules",
        "",
        *_kept_lines(results, config),
        "",
        "## Dev metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {value:.4f} |" for key, value in metrics.items()),
        "",
        "## Loading",
        "",
        "```python",
        f"from transformers import {auto}",
        "from peft import PeftModel",
        "",
        f'base = {auto}.from_pretrained("{hub_id or "BASE"}"{labels})  # the base model above',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
    ]
    path = folder / CARD_FILE
    path.write_text("\n".join(lines))
    return path
