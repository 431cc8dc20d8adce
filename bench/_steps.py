"""The measuring core shared by ``step_time.py`` and ``memory.py``: the variants and their steps.

Every variant is built in one process from the same backbone with the framework's own code
(``building.resolve`` for the family, task kind and candidates, ``methods.build``,
``TrainingModule.forward`` / ``configure_optimizers`` / ``_architecture_step`` /
``discretize``); only the Lightning trainer is stubbed out (:class:`BenchModule`). The baseline
is plain ``peft.get_peft_model`` + ``torch.optim.AdamW``.

Two grids (:data:`GRIDS`, ``--grid``): the encoder one (MiniLM-L6, sequence classification) and a
Llama-style decoder (a causal LM, the causal-LM loss on every token, as the commonsense recipes
train); the goals are the same for both.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import LoraConfig, get_peft_model

from diffora_lab import backbones, building, methods
from diffora_lab.adapters import peft_task_type
from diffora_lab.config import optim_settings, search_settings
from diffora_lab.dam import Mask
from diffora_lab.module import TrainingModule
from diffora_lab.tasks import get_task
from diffora_lab.tasks.kinds import TaskKind, get_kind

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = ("lora", "gated", "search", "post")
TARGETS = {"gated": 1.03, "search": 2.1, "post": 1.0}
DESCRIPTIONS = {
    "lora": "plain peft LoRA step (baseline)",
    "gated": "(a) gated weight step",
    "search": "(b) search step (weight + arch)",
    "post": "(c) step after discretization",
}


@dataclass(frozen=True)
class Grid:
    """What a grid measures: a backbone, a task, the batch shape, backbone config overrides."""

    backbone: str  # a conf/backbone option
    task: str  # a conf/task option (its kind decides the loss)
    batch: int
    seq: int
    vocab: int | None = None  # a config-built backbone's vocabulary (None: the tokenizer's)
    config: tuple[tuple[str, int], ...] = ()  # backbone.config overrides
    about: str = ""


GRIDS = {
    "encoder": Grid("minilm_l6", "synthetic", 32, 64, about="MiniLM-L6 (BERT), 36 modules"),
    # SmolLM2-135M's layer (hidden 576, 9 heads over 3 KV heads, MLP 1536) with 4 of its 30
    # layers, random weights; vocab 8192 keeps the lm_head's share of the matmul FLOPs per token
    # near SmolLM2's (25% here, 21% there; with its 49152 words 4 layers would give 67%).
    "decoder": Grid(
        "tiny_llama",
        "synthetic_choice",
        8,
        64,
        vocab=8192,
        config=(
            ("hidden_size", 576),
            ("num_hidden_layers", 4),
            ("num_attention_heads", 9),
            ("num_key_value_heads", 3),
            ("intermediate_size", 1536),
        ),
        about="Llama, SmolLM2-135M's layer shape, 4 layers, vocab 8192: 28 modules",
    ),
}


def compose_config(
    rank: int,
    budget: float,
    method: str = "diffora",
    backbone: str = "minilm_l6",
    task: str = "synthetic",
) -> DictConfig:
    """The project's own composed config (conf/config.yaml); MiniLM backbone by default."""
    overrides = [
        f"backbone={backbone}",
        f"task={task}",
        f"method={method}",
        "logger=none",
        f"rank={rank}",
        f"budget={budget}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def make_batches(
    n: int,
    batch: int,
    seq: int,
    vocab: int,
    seed: int = 0,
    device: str = "cpu",
    causal: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Random token ids (fixed seed); shapes are what matters for step time. ``causal``: a
    causal LM's batch (labels = the ids: the loss on every token), else a classifier's."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=gen)
        if causal:
            mask = torch.ones(batch, seq, dtype=torch.long)
            out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
            continue
        ids[:, 0] = 101  # [CLS]
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(batch, seq, dtype=torch.long),
                "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
                "labels": torch.randint(0, 2, (batch,), generator=gen),
            }
        )
    return [{k: v.to(device) for k, v in b.items()} for b in out]


class BenchModule(TrainingModule):
    """``TrainingModule`` driven without a Lightning ``Trainer``.

    Only the two trainer touch points of the search are replaced: the search batch comes from the
    benchmark's pool and ``manual_backward`` is a plain ``Tensor.backward`` (what Lightning's
    32-true CPU strategy does). ``forward``, ``configure_optimizers``, ``_architecture_step`` and
    ``discretize`` are the framework's own.
    """

    def attach(self, search_batches: list[dict[str, torch.Tensor]]) -> None:
        """Stands in for the trainer: one process, the weight optimizer, the search batches."""
        self._bench_batches = search_batches
        self._bench_i = 0
        # discretize() writes the rebuilt weight optimizer to trainer.strategy.optimizers.
        strategy = SimpleNamespace(optimizers=[], batch_to_device=lambda batch: batch)
        self._trainer = SimpleNamespace(
            strategy=strategy, datamodule=None, world_size=1, global_rank=0, sanity_checking=False
        )

    def set_weight_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._trainer.strategy.optimizers = [optimizer]

    def optimizers(self, use_pl_optimizer: bool = True):
        return self._trainer.strategy.optimizers[0]

    def _next_search_batch(self) -> dict[str, torch.Tensor]:
        batch = self._bench_batches[self._bench_i % len(self._bench_batches)]
        self._bench_i += 1
        self.search_batches_seen += 1
        return batch

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        loss.backward(*args, **kwargs)


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    step: Callable[[dict[str, torch.Tensor]], None]
    info: str = ""
    optimizer: torch.optim.Optimizer | None = None  # the baseline's (DiffoRA: module.optimizers())


def resolve(cfg: DictConfig) -> int:
    """Family, task kind and candidates written into ``cfg`` as ``train.prepare`` does it
    (``building.resolve``); returns the tokenizer's vocabulary size."""
    tokenizer = backbones.load_tokenizer(cfg.backbone)
    building.resolve(cfg, get_task(cfg.task.name), tokenizer)
    return len(tokenizer)


def task_kind(cfg: DictConfig) -> TaskKind:
    """The run's task kind, resolved into ``cfg`` first when it is not (``task.kind=auto``)."""
    if cfg.task.get("kind") in (None, "auto"):
        resolve(cfg)
    options = OmegaConf.to_container(cfg.task, resolve=True)
    return get_kind(cfg.task.kind)(get_task(cfg.task.name), options)


def _load_backbone(cfg: DictConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # same classifier-head init for every variant
    vocab = int(cfg.bench.vocab) if cfg.backbone.get("config") is not None else None
    return task_kind(cfg).load_model(cfg.backbone, vocab, None)


def _candidates(cfg: DictConfig, model: torch.nn.Module) -> list[backbones.Candidate]:
    return backbones.find_candidates(
        model, str(cfg.backbone.layer_pattern), dict(cfg.backbone.module_types)
    )


def build_lora(cfg: DictConfig, seed: int = 0) -> Variant:
    """Plain peft LoRA on the same candidate modules, plain AdamW on the trainable params."""
    backbone = _load_backbone(cfg, seed)
    candidates = _candidates(cfg, backbone)
    model = get_peft_model(
        backbone,
        LoraConfig(
            r=int(cfg.rank),
            lora_alpha=float(cfg.method.lora_alpha),
            lora_dropout=float(cfg.method.lora_dropout),
            target_modules=[c.name for c in candidates],
            modules_to_save=list(cfg.backbone.head_modules) or None,
            task_type=peft_task_type(backbone),
        ),
    )
    model.to(cfg.bench.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=float(cfg.train.lr), weight_decay=float(cfg.train.weight_decay)
    )

    def step(batch: dict[str, torch.Tensor]) -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    info = f"{len(candidates)} adapters, {n_lora} LoRA params"
    return Variant("lora", model, step, info, optimizer=opt)


def build_diffora(cfg: DictConfig, search_batches: list, seed: int = 0) -> tuple[BenchModule, list]:
    """The DiffoRA model exactly as ``methods.build`` makes it, wrapped in the LightningModule."""
    backbone = _load_backbone(cfg, seed)
    candidates = _candidates(cfg, backbone)
    built = methods.build(cfg, backbone, candidates)
    module = BenchModule(
        built.model,
        get_task(cfg.task.name),
        candidates,
        optim_settings(cfg),
        search_settings(cfg),
        dam=built.dam,
        mask=built.mask,
        kind=task_kind(cfg),
    )
    module.to(cfg.bench.device)  # before the optimizers are built, as Lightning does
    module.attach(search_batches)
    module.set_weight_optimizer(module.configure_optimizers())
    module.on_fit_start()  # model.train()
    return module, candidates


def weight_step(module: BenchModule, batch: dict[str, torch.Tensor]) -> None:
    """The body of ``TrainingModule.training_step`` (accumulate=1) minus clipping/lr/logging."""
    optimizer = module.optimizers()
    loss = module(batch).loss
    module.manual_backward(loss)
    optimizer.step()
    module._after_weight_step()
    optimizer.zero_grad(set_to_none=True)


def search_step(module: BenchModule, batch: dict[str, torch.Tensor]) -> None:
    """Weight step, then the framework's architecture step on the next search batch."""
    weight_step(module, batch)
    module._architecture_step(batch)  # train batch: used by dam.arch_grad=second only
    module.step += 1


def build_gated(cfg: DictConfig, search_batches: list, seed: int = 0) -> Variant:
    module, cands = build_diffora(cfg, search_batches, seed)
    return Variant("gated", module, partial(weight_step, module), f"{len(cands)} gated")


def build_search(cfg: DictConfig, search_batches: list, seed: int = 0) -> Variant:
    module, cands = build_diffora(cfg, search_batches, seed)
    info = f"{len(cands)} gated + arch step"
    return Variant("search", module, partial(search_step, module), info)


def build_post(
    cfg: DictConfig, train_batches: list, search_batches: list, seed: int = 0, search_steps: int = 3
) -> Variant:
    """A few real search steps, then the framework's discretization at ``cfg.budget``."""
    module, cands = build_diffora(cfg, search_batches, seed)
    for i in range(search_steps):
        search_step(module, train_batches[i % len(train_batches)])
    gates = module.current_gates().detach()
    mask = Mask.from_scores(
        gates,
        [c.name for c in cands],
        list(cfg.backbone.module_types),
        float(cfg.budget),
        step=module.step,
        backbone=str(cfg.backbone.name),
    )
    module.discretize(mask, gates)  # rebuilds the weight optimizer into trainer.strategy
    counts = ",".join(f"{t}={n}" for t, n in mask.counts_by_type().items())
    info = f"{mask.k} kept ({counts})"
    return Variant("post", module, partial(weight_step, module), info)


def grid_config(args: argparse.Namespace) -> tuple[DictConfig, Grid]:
    """The composed config of ``args.grid`` (default encoder), resolved, with ``cfg.bench``.

    ``args`` holds rank and budget and optionally grid, backbone (a conf/backbone option
    instead of the grid's), vocab (for config-built backbones) and device.
    """
    grid = GRIDS[getattr(args, "grid", None) or "encoder"]
    backbone = getattr(args, "backbone", None) or grid.backbone
    cfg = compose_config(args.rank, args.budget, backbone=backbone, task=grid.task)
    if backbone == grid.backbone:
        with open_dict(cfg):
            for key, value in grid.config:
                cfg.backbone.config[key] = value
    tokenizer_vocab = resolve(cfg)
    vocab = getattr(args, "vocab", None) or grid.vocab
    if vocab is None:
        vocab = tokenizer_vocab if cfg.backbone.get("config") is not None else cfg_vocab(cfg)
    with open_dict(cfg):
        cfg.bench = {"device": getattr(args, "device", "cpu"), "vocab": int(vocab)}
    return cfg, grid


def build_all(args: argparse.Namespace, names=VARIANTS) -> tuple[dict[str, Variant], list, list]:
    """Builds the variants named on the grid of :func:`grid_config`; ``args`` also holds batch
    and seq (None: the grid's)."""
    cfg, grid = grid_config(args)
    batch, seq = args.batch or grid.batch, args.seq or grid.seq
    shape = dict(vocab=int(cfg.bench.vocab), device=cfg.bench.device)
    causal = task_kind(cfg).causal_lm
    train_batches = make_batches(4, batch, seq, seed=1, causal=causal, **shape)
    search_batches = make_batches(4, batch, seq, seed=2, causal=causal, **shape)
    builders = {
        "lora": lambda: build_lora(cfg),
        "gated": lambda: build_gated(cfg, search_batches),
        "search": lambda: build_search(cfg, search_batches),
        "post": lambda: build_post(cfg, train_batches, search_batches),
    }
    return {n: builders[n]() for n in names}, train_batches, search_batches


def cfg_vocab(cfg: DictConfig) -> int:
    """The vocabulary size: the tokenizer's for config-built backbones, else the model's."""
    import transformers

    if cfg.backbone.get("config") is not None:
        return len(backbones.load_tokenizer(cfg.backbone))
    source = backbones.resolve_source(cfg.backbone)
    return transformers.AutoConfig.from_pretrained(source).vocab_size


def step_runner(device: str = "cpu", precision: str = "32-true") -> Callable[[Variant, dict], None]:
    """Runs one step of a variant as the Trainer would run it.

    ``bf16-mixed`` wraps the whole step in ``torch.autocast`` (Lightning's precision plugin wraps
    ``training_step``, manual backward included). On a GPU the launch queue is drained after the
    step, so the wall time measured around the call is the step's own.
    """
    device_type = torch.device(device).type
    mixed = precision == "bf16-mixed"
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"--precision {precision!r}: use 32-true or bf16-mixed")

    def run(variant: Variant, batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=mixed):
            variant.step(batch)
        if device_type == "cuda":
            torch.cuda.synchronize()

    return run


def reexec_with_omp_policy(policy: str) -> None:
    """Restarts this script with ``OMP_WAIT_POLICY`` set (OpenMP reads it only at start-up).

    On a shared machine whose 2 cores are also busy with other jobs, OpenMP's default
    spin-waiting makes a 2-thread step several times slower and very noisy (a descheduled
    thread stalls the other at every barrier); ``PASSIVE`` makes idle threads sleep instead.
    The policy applies to every variant alike.
    """
    if policy == "default" or os.environ.get("OMP_WAIT_POLICY"):
        return
    env = dict(os.environ, OMP_WAIT_POLICY=policy.upper())
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def add_omp_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "default"),
        default="passive",
        help="OMP_WAIT_POLICY to re-run under unless already set (default: passive)",
    )


def quiet() -> None:
    """Silence the load reports of transformers (the head is new on purpose)."""
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
