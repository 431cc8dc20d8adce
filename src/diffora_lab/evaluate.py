"""Scoring and export of finished runs: dev metrics of an adapter folder, merged full models.

``python -m diffora_lab.evaluate PATH`` scores on the task's dev set, with the training harness's
own code path (:class:`~diffora_lab.data.TaskDataModule`, :class:`~diffora_lab.module.
TrainingModule`'s validation, the same trainer settings), so on a finished run it prints exactly
the ``metrics`` of its ``results.json`` under the same names (``val/accuracy``, ...). PATH is one
of:

- a run folder: its config comes from ``.hydra/config.yaml`` (or, without it, from the config
  stored in ``checkpoints/last.ckpt``); the model from ``adapter/`` (LoRA-type methods and
  AdaLoRA), else ``merged/``, else ``checkpoints/last.ckpt`` (``full``, ``bitfit``);
- an adapter folder (``adapter_config.json``) or a merged model folder (``config.json``): the
  config comes from the run folder around it, or is composed from ``--backbone`` and ``--task``.

A run folder that has not finished (no ``results.json``) is refused: its checkpoint is not the
run's result. ``--unfinished`` scores it anyway, with a note naming its step.

``--task`` and ``--data-dir`` override the run's task and GLUE folder (e.g. the same adapter on
a local copy of GLUE).

Merged models are written by :func:`diffora_lab.export.export_merged`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel
from torch import nn

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


@dataclass
class Source:
    """Where a model to score comes from, and the run config that describes it."""

    cfg: DictConfig
    adapter: Path | None = None
    merged: Path | None = None
    checkpoint: Path | None = None

    @property
    def kind(self) -> str:
        if self.adapter is not None:
            return "adapter"
        if self.merged is not None:
            return "merged"
        return "checkpoint"


def _run_config(run_dir: Path) -> DictConfig | None:
    from diffora_lab.checkpointing import read_checkpoint
    from diffora_lab.saved_config import upgrade  # a run saved by an earlier version

    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        try:
            cfg = OmegaConf.load(hydra_cfg)
        except Exception as error:  # YAML errors come in several classes
            cfg, why = None, f"{type(error).__name__}: {str(error).splitlines()[0]}"
        else:
            why = "not a run's config"
        if not isinstance(cfg, DictConfig) or "task" not in cfg or "backbone" not in cfg:
            raise ValueError(
                f"{hydra_cfg} is damaged ({why}); restore it, or delete it to use the config "
                "stored in checkpoints/last.ckpt."
            )
        return upgrade(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        saved = read_checkpoint(ckpt)
        config = saved.get("hyper_parameters", {}).get("config")
        if config:
            return upgrade(OmegaConf.create(config))
    return None


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffora_lab.runtime import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def locate(path: str | Path, backbone: str | None = None, task: str | None = None) -> Source:
    """Finds the model and the run config for PATH (see the module docstring).

    Raises:
        ValueError: PATH is none of the accepted folders, or no config can be found for it.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: pass a run folder or an adapter folder.")
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        model_dir, run_dir = path, path.parent
    else:
        model_dir, run_dir = None, path
    cfg = _run_config(run_dir)
    if cfg is None:
        if model_dir is None:
            raise ValueError(
                f"{path}: no .hydra/config.yaml, checkpoints/last.ckpt, adapter_config.json or "
                "config.json; pass a run folder (or its adapter/ folder)."
            )
        if backbone is None or task is None:
            raise ValueError(
                f"{path} is not inside a run folder, so its backbone and task are unknown: "
                "pass --backbone NAME and --task NAME (conf/backbone/, conf/task/)."
            )
        cfg = _compose([f"backbone={backbone}", f"task={task}", "logger=none"])
    if model_dir is not None:
        if (model_dir / "adapter_config.json").is_file():
            return Source(cfg, adapter=model_dir)
        return Source(cfg, merged=model_dir)
    if (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return Source(cfg, adapter=run_dir / ADAPTER_DIR)
    if (run_dir / MERGED_DIR / "config.json").is_file():
        return Source(cfg, merged=run_dir / MERGED_DIR)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return Source(cfg, checkpoint=ckpt)
    raise ValueError(f"{path}: the run has no adapter/, merged/ or checkpoints/last.ckpt.")


def check_finished(source: Source, path: str | Path, allow_unfinished: bool = False) -> None:
    """Refuses a run folder that has not finished (scored from its checkpoint, no results.json);
    with ``allow_unfinished`` prints a note naming its step instead.

    Raises:
        ValueError: Naming the step and how to finish the run or score it anyway.
    """
    from diffora_lab.checkpointing import STATE_KEY, read_checkpoint

    if source.checkpoint is None or (source.checkpoint.parents[1] / "results.json").is_file():
        return
    step = read_checkpoint(source.checkpoint, mmap=True).get(STATE_KEY, {}).get("step", "?")
    partial = (
        f"{path} has not finished (no results.json; its checkpoint is at step {step} of "
        f"{source.cfg.train.max_steps})"
    )
    if not allow_unfinished:
        raise ValueError(
            f"{partial}: finish it with python -m diffora_lab hydra.run.dir={path}, or pass "
            "--unfinished to score the checkpoint as it is."
        )
    print(f"note: {partial}; scoring the checkpoint as it is.", file=sys.stderr)


def _with_overrides(cfg: DictConfig, task: str | None, data_dir: str | None) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if task is not None and task != cfg.task.name:
            cfg.task = _compose([f"task={task}", "logger=none"]).task
        if data_dir is not None:
            cfg.task.data_dir = str(data_dir)
        # Resuming and mask files matter for training only; their paths may be stale here.
        cfg.ckpt_path = None
        cfg.dam.mask_path = None
    return cfg


def load_model(source: Source, cfg: DictConfig, prepared) -> nn.Module:
    """Builds the model to score: base + adapter, a merged folder, or a checkpoint's weights.

    ``prepared`` is what ``train.prepare`` returned (its task kind picks the model class).
    """
    from diffora_lab import backbones, building
    from diffora_lab.checkpointing import STATE_KEY, fill, read_checkpoint

    if source.merged is not None:
        import transformers

        auto = (
            transformers.AutoModelForCausalLM
            if prepared.kind.causal_lm
            else transformers.AutoModelForSequenceClassification
        )
        return auto.from_pretrained(
            str(source.merged), dtype=backbones.model_dtype(cfg.backbone, prepared.kind.causal_lm)
        )
    backbone = building.load_model(cfg, prepared.resolved, prepared.tokenizer)
    if source.adapter is not None:
        with warnings.catch_warnings():
            # peft reads an AdaLoRA rank_pattern (kept singular values) as LoRA's per-module
            # ranks too, warns that its keys match no module, then resizes correctly anyway.
            warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
            return PeftModel.from_pretrained(backbone, str(source.adapter))
    from diffora_lab.methods import get_method

    if get_method(cfg.method.name).exports_adapter:
        raise ValueError(
            f"{source.checkpoint}: a {cfg.method.name} run is scored from its adapter/ folder "
            "(written at the end of training), which this run lacks."
        )
    checkpoint = read_checkpoint(source.checkpoint)
    # Checkpoints leave the frozen backbone out (checkpointing.py): filled from the one loaded.
    current = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state = checkpoint["state_dict"]
    record = checkpoint.get(STATE_KEY, {}).get("backbone")
    fill(state, current, list(current), record, source=str(source.checkpoint))
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    backbone.load_state_dict(weights)
    return backbone


def _dev_data(cfg: DictConfig, prepared, batch_size: int | None):
    """The run's dev splits in a data module built as training builds it."""
    from diffora_lab.data import TaskDataModule
    from diffora_lab.tasks import RawSplits, load_raw

    raw = load_raw(
        prepared.spec,
        cfg.task.get("data_dir") or None,
        seed=int(cfg.seed),
        # A GLUE task has no `synthetic` node (e.g. a synthetic run's adapter scored on RTE).
        synthetic=(
            OmegaConf.to_container(cfg.task.synthetic) if cfg.task.get("synthetic") else None
        ),
        hub_id=cfg.task.get("hub_id"),
        dev_limit=cfg.task.get("dev_limit"),
    )
    # The data module tokenizes a train split; scoring never reads it, so the dev set stands in
    # (no tokenization of e.g. MNLI's 393k train pairs).
    first_dev = next(iter(raw.dev.values()))
    return TaskDataModule(
        prepared.spec,
        RawSplits(train=first_dev, dev=raw.dev),
        prepared.tokenizer,
        max_length=int(cfg.task.max_length),
        batch_size=int(cfg.train.batch_size),
        eval_batch_size=int(batch_size or cfg.train.eval_batch_size),
        seed=int(cfg.seed),
        search_split=0.0,
        cache_dir=cfg.data.cache_dir,
        num_workers=int(cfg.data.num_workers),
        bucketing=int(cfg.data.get("bucketing") or 0),
        kind=prepared.kind,
    )


def evaluate(
    path: str | Path,
    task: str | None = None,
    data_dir: str | None = None,
    backbone: str | None = None,
    batch_size: int | None = None,
    allow_unfinished: bool = False,
) -> dict[str, float]:
    """Dev metrics of the model at PATH, keyed as in training (``val/accuracy``, ...).

    Args:
        path: A run folder, an adapter folder or a merged model folder.
        task: Score on this task instead of the run's.
        data_dir: GLUE folder (original TSV layout) instead of the run's ``task.data_dir``.
        backbone: Backbone name, for a folder outside any run.
        batch_size: Dev batch size (default: the run's ``train.eval_batch_size``, which is what
            reproduces ``results.json`` bit for bit).
        allow_unfinished: Score a run folder that has not finished (its checkpoint as it is;
            a note says so). Without it such a folder is refused.
    """
    from diffora_lab.config import optim_settings, search_settings
    from diffora_lab.module import TrainingModule
    from diffora_lab.train import build_trainer, prepare

    source = locate(path, backbone=backbone, task=task)
    check_finished(source, path, allow_unfinished)
    cfg = _with_overrides(source.cfg, task, data_dir)
    prepared = prepare(cfg)
    spec = prepared.spec
    model = load_model(source, cfg, prepared)
    datamodule = _dev_data(cfg, prepared, batch_size)
    module = TrainingModule(
        model,
        spec,
        [],
        optim_settings(cfg),
        replace(search_settings(cfg), enabled=False, steps=0),
        kind=prepared.kind,
    )
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(cfg, Path(scratch), logger=False, callbacks=[])
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return dict(module.last_val)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffora_lab.evaluate PATH [--task T] [--data-dir D] ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m diffora_lab.evaluate",
        description="Score a run folder, an adapter folder or a merged model on a dev set.",
    )
    parser.add_argument("path", help="run folder, adapter folder or merged model folder")
    parser.add_argument("--task", help="task name (conf/task/); default: the run's")
    parser.add_argument("--data-dir", help="GLUE folder in the original TSV layout")
    parser.add_argument("--backbone", help="backbone name (conf/backbone/) outside a run folder")
    parser.add_argument("--batch-size", type=_positive, help="dev batch size; default: the run's")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument(
        "--unfinished", action="store_true", help="score a run that has not finished (labelled)"
    )
    args = parser.parse_args(argv)
    if args.json and not Path(args.json).expanduser().parent.is_dir():
        parser.error(f"--json {args.json}: no folder {Path(args.json).parent}; create it first.")
    if args.json and Path(args.json).expanduser().is_dir():
        parser.error(f"--json {args.json} is a folder; give a file name.")

    from diffora_lab.runtime import quiet_libraries
    from diffora_lab.train import ConfigError

    quiet_libraries()
    try:
        metrics = evaluate(
            args.path,
            task=args.task,
            data_dir=args.data_dir,
            backbone=args.backbone,
            batch_size=args.batch_size,
            allow_unfinished=args.unfinished,
        )
    except (ConfigError, ValueError) as error:
        print(f"diffora_lab.evaluate: error: {error}", file=sys.stderr)
        return 2
    for key, value in metrics.items():
        print(f"{key} {value:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
