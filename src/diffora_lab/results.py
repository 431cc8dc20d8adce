"""What a finished run reports: ``results.json``, the W&B summary and the printed summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from diffora_lab.backbones import Candidate
from diffora_lab.dam import gate_entropy
from diffora_lab.matching import achieved, target_rank_of
from diffora_lab.module import TrainingModule


def collect_results(
    cfg: DictConfig,
    module: TrainingModule,
    candidates: list[Candidate],
    started: float,
    output_dir: Path,
) -> dict[str, Any]:
    params = module.trainable_parameters()
    mask = module.mask
    spec = module.spec
    results = {
        "task": spec.name,
        "method": cfg.method.name,
        # The search variant's name for it (searches/), else the method file's preset.
        "preset": module.variant.preset if module.variant else cfg.method.get("preset"),
        "backbone": cfg.backbone.name,
        # Only module-selecting methods have one: others record none (reports group them as one).
        "budget": float(cfg.budget) if module.method.uses_budget else None,
        "budget_unit": (
            str(cfg.get("budget_unit") or "params") if module.method.uses_budget else None
        ),
        "rank": int(cfg.rank),
        "seed": int(cfg.seed),
        "params_trainable": params["total"],
        "params": params,
        "candidate_modules": len(candidates),
        **_selection(mask),
        # The classifier's output size: what a user passes as num_labels to load the adapter
        # (None for a causal-LM task: the answers are words of the LM head, no classifier).
        "num_labels": None if module.kind.causal_lm else spec.num_labels,
        "primary_metric": f"val/{spec.primary_metric}",
        "metrics": dict(module.last_val),
        # The size of one dev example in the metric: the report's budget curve states it.
        "dev_examples": len(module.trainer.datamodule.dev[spec.dev_splits[0]]),
        "discretization": _discretization(module.discretization),
        "steps": module.step,
        "world_size": module.trainer.world_size,
        "ranks_consistent": module.ranks_consistent,
        "wall_seconds": round(time.time() - started, 2),
        "output_dir": str(output_dir),
    }
    if module.variant is not None:
        results["search_variant"] = module.variant.describe()
    budget = module.method.budget(cfg, candidates) if module.method.uses_budget else None
    if budget is not None and mask is not None:
        # Target against achieved, in the budget's unit (the report flags > one module off).
        results["budget_count"] = budget.summary(mask.kept)
    if cfg.method.get("scaling") is not None:
        method = cfg.method
        results["lora_scaling"] = {"rule": str(method.scaling), "scale": method.get("scale")}
    target_rank = target_rank_of(cfg)
    if target_rank is not None and mask is not None:
        results["match"] = achieved(mask.kept, candidates, int(cfg.rank), target_rank).as_dict()
    results.update(module.method.results(module.model, candidates))
    return results


def _selection(mask) -> dict[str, Any]:
    """What the run's mask kept (nothing for methods without one) and its gates' entropy."""
    if mask is None:
        return {"kept_modules": [], "kept_by_type": {}, "k": 0, "dam_entropy": None}
    searched = mask.source == "search"
    return {
        "kept_modules": mask.kept_modules,
        "kept_by_type": mask.counts_by_type(),
        "k": mask.k,
        "dam_entropy": float(gate_entropy(torch.tensor(mask.gates))) if searched else None,
    }


def _discretization(record: dict[str, Any]) -> dict[str, Any]:
    """The dev metric before and after the cut, its step and the gap (None without a cut)."""
    before, after = record.get("val_before"), record.get("val_after")
    return {
        "val_before": before,
        "val_after": after,
        "step": record.get("step"),
        "gap": before - after if before is not None else None,
    }


def summary_for_logger(results: dict[str, Any]) -> dict[str, Any]:
    flat = {f"final/{k.split('/', 1)[-1]}": v for k, v in results["metrics"].items()}
    flat.update(
        {
            "params/trainable": results["params_trainable"],
            "dam/k": results["k"],
            "dam/sparsity": 1 - results["k"] / max(1, results["candidate_modules"]),
            "dam/entropy": results["dam_entropy"],
            "dam/kept_modules": results["kept_modules"],
            "dam/kept_by_type": results["kept_by_type"],
            "dam/val_before": results["discretization"]["val_before"],
            "dam/val_after": results["discretization"]["val_after"],
        }
    )
    return flat


def _uses_budget(results: dict[str, Any]) -> bool:
    from diffora_lab.runs import run_budget

    return run_budget(results) is not None


def _search_line(results: dict[str, Any]) -> str | None:
    """What searched the modules: the variant and preset, or which run's search was reused (all
    of it, or up to a snapshot this run continued from)."""
    from diffora_lab.runs import search_label

    variant = search_label(results)
    if variant is None:
        return None
    preset = results.get("preset") or "default"
    # The preset of a search variant is its name (the header names it too): said once.
    what = variant if variant.split("+")[0] == preset else f"{variant} (preset {preset})"
    search = results.get("search") or {}
    steps = (results.get("discretization") or {}).get("step")
    if search.get("reused"):
        source = search.get("source") or {}
        made_by = f"{source.get('run_folder') or 'another run'} (cache entry {search.get('key')})"
        if source.get("exact", True):
            return f"  search              reused from {made_by}: {what}, not run again"
        return (
            f"  search              continued from step {source.get('step')} of {made_by}: "
            f"{what}" + (f", {steps} steps" if steps is not None else "")
        )
    return f"  search              {what}" + (f", {steps} steps" if steps is not None else "")


def _time_line(results: dict[str, Any]) -> str:
    """The wall time and how it splits; a reused search shows 0 s of search and says so."""
    seconds = results.get("seconds")
    line = f"  time                {results['wall_seconds']:.0f} s"
    if not seconds:
        return line
    parts = [f"start-up {seconds['startup']:.0f} s"]
    if results.get("search_variant"):
        search = results.get("search") or {}
        source = search.get("source") or {}
        note = ""
        if search.get("reused"):
            exact = source.get("exact", True)
            note = " (reused)" if exact else f" (from step {source.get('step')})"
        parts.append(f"search {seconds['search']:.0f} s{note}")
    parts += [
        f"fine-tune {seconds['finetune']:.0f} s",
        f"scoring and export {seconds['other']:.0f} s",
    ]
    return f"{line}: " + ", ".join(parts)


def summary_text(results: dict[str, Any], output_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    from diffora_lab.runs import method_label

    primary = results["primary_metric"]
    disc = results["discretization"]
    lines = [
        "",
        "=" * 72,
        f"diffora_lab: {method_label(results)} on {results['task']} ({results['backbone']}, "
        # Only module-selecting methods have a budget; the others adapt every candidate.
        + (f"budget {results['budget']}, " if _uses_budget(results) else "")
        + f"rank {results['rank']}, seed {results['seed']})",
    ]
    search = _search_line(results)
    if search:
        lines.append(search)
    lines += [
        f"  steps               {results['steps']}",
        _time_line(results),
        f"  trainable params    {results['params_trainable']:,} "
        f"(adapter {results['params']['adapter']:,}, head {results['params']['head']:,}"
        + (
            f", backbone {results['params']['backbone']:,})"
            if results["params"]["backbone"]
            else ")"
        ),
    ]
    if results["kept_modules"]:
        lines.append(
            f"  kept modules        {results['k']}/{results['candidate_modules']}  "
            + " ".join(f"{t}:{n}" for t, n in results["kept_by_type"].items())
        )
    if disc["val_before"] is not None:
        lines.append(
            f"  discretization      {primary} {disc['val_before']:.4f} -> "
            f"{disc['val_after']:.4f} (step {disc['step']})"
        )
    for key, value in results["metrics"].items():
        lines.append(f"  final {key:<14}{value:.4f}")
    for warning in results.get("warnings") or []:
        lines.append(f"  warning             {warning}")
    written = ["results.json", "checkpoints/last.ckpt"]
    for name in ("dam/mask.json", "dam/heatmaps/", "adapter/", "merged/"):
        if (output_dir / name).exists():
            written.append(name)
    lines += [
        f"  outputs             {output_dir}",
        "                      " + ", ".join(written),
        "=" * 72,
    ]
    return "\n".join(lines)
