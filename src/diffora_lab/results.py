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
        "kept_modules": mask.kept_modules if mask is not None else [],
        "kept_by_type": mask.counts_by_type() if mask is not None else {},
        "k": mask.k if mask is not None else 0,
        "dam_entropy": (
            float(gate_entropy(torch.tensor(mask.gates)))
            if mask is not None and mask.source == "search"
            else None
        ),
        # The classifier's output size: what a user passes as num_labels to load the adapter.
        "num_labels": spec.num_labels,
        "primary_metric": f"val/{spec.primary_metric}",
        "metrics": dict(module.last_val),
        # The size of one dev example in the metric: the report's budget curve states it.
        "dev_examples": len(module.trainer.datamodule.dev[spec.dev_splits[0]]),
        "discretization": {
            "val_before": module.discretization.get("val_before"),
            "val_after": module.discretization.get("val_after"),
            "step": module.discretization.get("step"),
            "gap": (
                module.discretization["val_before"] - module.discretization["val_after"]
                if module.discretization.get("val_before") is not None
                else None
            ),
        },
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


def _uses_budget(method: str) -> bool:
    from diffora_lab.methods.registry import get_method

    try:
        return get_method(method).uses_budget
    except (KeyError, ValueError):
        return True


def summary_text(results: dict[str, Any], output_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    primary = results["primary_metric"]
    disc = results["discretization"]
    lines = [
        "",
        "=" * 72,
        f"diffora_lab: {results['method']} on {results['task']} ({results['backbone']}, "
        # Only module-selecting methods have a budget; the others adapt every candidate.
        + (f"budget {results['budget']}, " if _uses_budget(results["method"]) else "")
        + f"rank {results['rank']}, seed {results['seed']})",
        f"  steps               {results['steps']}  ({results['wall_seconds']:.0f} s)",
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
