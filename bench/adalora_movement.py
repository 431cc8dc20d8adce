"""How far the adapters move: ||delta W|| of LoRA and AdaLoRA variants at the same steps.

Each variant is the study's job (``bench/gpu_study.py``'s overrides: MiniLM, batch 32, lr 1e-3,
max length 64, ``train.max_steps`` of the study, so the lr schedule and AdaLoRA's budget
schedule are the real run's) trained with the harness's own module and data for the first
``--steps`` steps on TRAIN batches only (no validation, nothing is scored). Every ``--every``
steps it records the Frobenius norm of all the updates the adapters add (LoRA: ``s B A``;
AdaLoRA: ``s P diag(E) Q``, :func:`~diffora_lab.methods.adalora.adapter_stats`) and prints them
side by side with the ratio to the first variant.

    OMP_NUM_THREADS=1 python bench/adalora_movement.py --task cola --steps 100 \\
        --variants lora adalora "adalora:method.scale=16"

A variant is a ``gpu_study`` method name, optionally followed by ``:`` and extra overrides
separated by commas.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_study  # noqa: E402

from diffora_lab.methods.adalora import adapter_stats  # noqa: E402
from diffora_lab.train import assemble, prepare  # noqa: E402


@torch.no_grad()
def delta_w(model: torch.nn.Module) -> dict[str, float]:
    """``delta_w`` (and AdaLoRA's ``e_norm``) of every adapter in ``model``."""
    if any(hasattr(m, "lora_E") for m in model.modules()):
        stats = adapter_stats(model)
        return {"delta_w": stats["delta_w"], "e_norm": stats["e_norm"]}
    total = 0.0
    for module in model.modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        left = module.lora_B["default"].weight
        right = module.lora_A["default"].weight
        total += float((module.scaling["default"] * (left @ right)).pow(2).sum())
    return {"delta_w": math.sqrt(total)}


class Movement(pl.Callback):
    """Records :func:`delta_w` after every ``every``-th weight step."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.step % self.every == 0:
            self.rows.append({"step": pl_module.step, **delta_w(pl_module.model)})


def overrides_of(variant: str, task: str, seed: int, data_dir: str, cache: Path) -> list[str]:
    name, _, extra = variant.partition(":")
    settings = gpu_study.task_settings(task, "cpu", 1.0)
    return [
        *gpu_study.COMMON,
        *gpu_study.SPEEDUPS,
        "backbone=minilm_l6",
        f"task={task}",
        f"task.data_dir={data_dir}",
        f"task.max_length={settings['max_length']}",
        f"train.max_steps={settings['max_steps']}",
        f"seed={seed}",
        "logger=none",
        *gpu_study.METHODS[name],
        f"data.cache_dir={cache}",
        *[e for e in extra.split(",") if e],
    ]


def trace(overrides: list[str], steps: int, every: int) -> list[dict[str, float]]:
    with initialize_config_dir(config_dir=str(gpu_study.REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    pl.seed_everything(int(cfg.seed), verbose=False)
    assembled = assemble(cfg, prepare(cfg))
    movement = Movement(every)
    trainer = pl.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[movement],
    )
    trainer.fit(assembled.module, datamodule=assembled.datamodule)
    return movement.rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cola")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=str(gpu_study.REPO.parent / "shared/data/glue"))
    parser.add_argument("--variants", nargs="+", default=["lora", "adalora"])
    parser.add_argument("--out", help="write the traces here (JSON)")
    args = parser.parse_args(argv)
    traces = {}
    with tempfile.TemporaryDirectory() as cache:
        for variant in args.variants:
            overrides = overrides_of(variant, args.task, args.seed, args.data_dir, Path(cache))
            traces[variant] = trace(overrides, args.steps, args.every)
    first = args.variants[0]
    print(f"||delta W|| ({args.task}, seed {args.seed}; ratio to {first})")
    print("| step | " + " | ".join(args.variants) + " |")
    print("|---" * (len(args.variants) + 1) + "|")
    for i, row in enumerate(traces[first]):
        cells = []
        for variant in args.variants:
            value = traces[variant][i]["delta_w"]
            ratio = value / row["delta_w"] if row["delta_w"] else float("nan")
            cells.append(f"{value:.3f} ({ratio:.2f}x)")
        print(f"| {row['step']} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "traces": traces}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
