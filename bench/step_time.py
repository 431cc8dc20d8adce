"""Step time of DiffoRA's training steps relative to a plain peft LoRA step, side by side.

Four models are built in one process from the same pretrained backbone (all-MiniLM-L6-v2, LoRA
rank 8 on the same 36 candidate modules: q, k, v, o, ffn_in, ffn_out of 6 layers):

* ``lora``   -- plain peft LoRA (``get_peft_model``) + ``torch.optim.AdamW``: the baseline;
* ``gated``  -- DiffoRA weight step: ``DiffoRAModule.forward`` sets the (detached) DAM gates in
  ``GateHooks``, then forward + backward + AdamW (from ``DiffoRAModule.configure_optimizers``);
* ``search`` -- a full search step: the weight step above, then
  ``DiffoRAModule._architecture_step`` on another batch (gates with grad, backward only into
  ``dam.logits``, Adam on the logits);
* ``post``   -- a weight step after ``DiffoRAModule.discretize`` at budget 0.5 (``apply_mask``
  keeps 18 of 36 adapters, gates folded into B, optimizer rebuilt); the mask is the top 18 gates
  (``Mask.from_scores``) after 3 real search steps on the benchmark's random batches.

Gradient clipping and the lr schedule are left out of every variant. The variants are
interleaved step by step (rotating their order each round); each round gives one time ratio
``variant / lora``, and the table reports the median ratio over rounds. Absolute times are printed
for context only: the machine is shared and noisy, only the side-by-side ratios are claims.
The script re-runs itself under ``OMP_WAIT_POLICY=PASSIVE`` (see :func:`reexec_with_omp_policy`).

Run from the repository root::

    python bench/step_time.py                 # 7 rounds x 2 steps, batch 32, seq 64
    python bench/step_time.py --quick         # a smoke run (~1 min)
    python bench/step_time.py --profile search  # torch.profiler table of one step of a variant
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model

from diffora_lab import backbones, methods
from diffora_lab.config import optim_settings, search_settings
from diffora_lab.dam import Mask
from diffora_lab.module import DiffoRAModule
from diffora_lab.tasks import get_task

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = ("lora", "gated", "search", "post")
TARGETS = {"gated": 1.03, "search": 2.1, "post": 1.0}
DESCRIPTIONS = {
    "lora": "plain peft LoRA step (baseline)",
    "gated": "(a) gated weight step",
    "search": "(b) search step (weight + arch)",
    "post": "(c) step after discretization",
}


def compose_config(rank: int, budget: float, method: str = "diffora") -> DictConfig:
    """The project's own composed config (conf/config.yaml), MiniLM backbone."""
    overrides = [
        "backbone=minilm_l6",
        "task=synthetic",
        f"method={method}",
        "logger=none",
        f"rank={rank}",
        f"budget={budget}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def make_batches(
    n: int, batch: int, seq: int, vocab: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random token ids (fixed seed); shapes are what matters for step time."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (batch, seq), generator=gen)
        ids[:, 0] = 101  # [CLS]
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(batch, seq, dtype=torch.long),
                "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
                "labels": torch.randint(0, 2, (batch,), generator=gen),
            }
        )
    return out


class BenchModule(DiffoRAModule):
    """``DiffoRAModule`` driven without a Lightning ``Trainer``.

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


def _load_backbone(cfg: DictConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # same classifier-head init for every variant
    return backbones.load_backbone(cfg.backbone, num_labels=2)


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
            modules_to_save=list(cfg.backbone.head_modules),
            task_type="SEQ_CLS",
        ),
    )
    model.train()
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
        get_task("synthetic"),
        candidates,
        optim_settings(cfg),
        search_settings(cfg),
        dam=built.dam,
        mask=built.mask,
    )
    module.attach(search_batches)
    module.set_weight_optimizer(module.configure_optimizers())
    module.on_fit_start()  # model.train()
    return module, candidates


def weight_step(module: BenchModule, batch: dict[str, torch.Tensor]) -> None:
    """The body of ``DiffoRAModule.training_step`` (accumulate=1) minus clipping/lr/logging."""
    optimizer = module.optimizers()
    loss = module(batch).loss
    module.manual_backward(loss)
    optimizer.step()
    module._after_weight_step()
    optimizer.zero_grad(set_to_none=True)


def search_step(module: BenchModule, batch: dict[str, torch.Tensor]) -> None:
    """Weight step, then the framework's architecture step on the next search batch."""
    weight_step(module, batch)
    module._architecture_step(batch)  # train batch: used by dam.order=second only
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


def build_all(args: argparse.Namespace, names=VARIANTS) -> tuple[dict[str, Variant], list, list]:
    cfg = compose_config(args.rank, args.budget)
    vocab = int(cfg_vocab(cfg))
    train_batches = make_batches(4, args.batch, args.seq, vocab, seed=1)
    search_batches = make_batches(4, args.batch, args.seq, vocab, seed=2)
    builders = {
        "lora": lambda: build_lora(cfg),
        "gated": lambda: build_gated(cfg, search_batches),
        "search": lambda: build_search(cfg, search_batches),
        "post": lambda: build_post(cfg, train_batches, search_batches),
    }
    return {n: builders[n]() for n in names}, train_batches, search_batches


def cfg_vocab(cfg: DictConfig) -> int:
    import transformers

    source = backbones.resolve_source(cfg.backbone)
    return transformers.AutoConfig.from_pretrained(source).vocab_size


def time_interleaved(
    variants: dict[str, Variant],
    batches: list,
    rounds: int,
    steps: int,
    time_limit: float = float("inf"),
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of each variant, wall-clock and process CPU time.

    Returns ``{"round": {variant: [mean wall s/step per round]}, "step": {variant: [wall s of
    each step]}, "cpu": {variant: [CPU s of each step]}}``. Within a round the variants alternate
    step by step (``lora, gated, search, post, lora, ...``), the order rotating each round, so a
    burst of load from other jobs hits all of them alike. Rounds stop early (after at least 3)
    when the next one would end past ``time_limit`` seconds.
    """
    names = list(variants)
    out: dict[str, dict[str, list[float]]] = {
        k: {n: [] for n in names} for k in ("round", "step", "cpu")
    }
    start = time.perf_counter()
    for r in range(rounds):
        round_start = time.perf_counter()
        order = names[r % len(names) :] + names[: r % len(names)]
        total = dict.fromkeys(names, 0.0)
        for i in range(steps):
            batch = batches[i % len(batches)]
            for name in order:
                c0, t0 = time.process_time(), time.perf_counter()
                variants[name].step(batch)
                took, cpu = time.perf_counter() - t0, time.process_time() - c0
                total[name] += took
                out["step"][name].append(took)
                out["cpu"][name].append(cpu)
        for name in names:
            out["round"][name].append(total[name] / steps)
        print(
            f"  round {r + 1}/{rounds}: "
            + "  ".join(f"{n}={1e3 * out['round'][n][-1]:.0f}ms" for n in names),
            flush=True,
        )
        now = time.perf_counter()
        if r + 1 >= 3 and r + 1 < rounds and now + (now - round_start) - start > time_limit:
            print(f"  stopping after {r + 1} rounds: --time-limit {time_limit:.0f}s reached")
            break
    return out


def profile_variant(variant: Variant, batches: list, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    for i in range(2):
        variant.step(batches[i % len(batches)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3):
            with record_function(f"{variant.name}_step"):
                variant.step(batches[i % len(batches)])
    print(f"\n== torch.profiler, 3 steps of {variant.name!r} ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--time-limit", type=float, default=160.0, help="seconds of timing before rounds stop early"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS[1:],
        default=list(VARIANTS[1:]),
        help="variants timed against the LoRA baseline (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 rounds x 3 steps, batch 16 (too few rounds to resolve a 3%% target)",
    )
    parser.add_argument(
        "--profile", choices=VARIANTS, nargs="+", help="print a torch.profiler table instead"
    )
    add_omp_flag(parser)
    args = parser.parse_args(argv)
    reexec_with_omp_policy(args.omp_wait_policy)
    if args.quick:
        args.rounds, args.steps, args.batch, args.warmup = 3, 3, 16, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; MiniLM-L6, batch "
        f"{args.batch}, seq {args.seq}, rank {args.rank}, budget {args.budget}"
    )
    if args.profile:
        names = tuple(args.profile)
    else:
        names = ("lora", *[n for n in VARIANTS[1:] if n in args.variants])
    variants, train_batches, _ = build_all(args, names)
    for v in variants.values():
        print(f"  {v.name:7s} {DESCRIPTIONS[v.name]:34s} {v.info}")
    if args.profile:
        for name in names:
            profile_variant(variants[name], train_batches)
        return 0

    for v in variants.values():
        for i in range(args.warmup):
            v.step(train_batches[i % len(train_batches)])
    print(f"timing: {args.rounds} rounds x {args.steps} steps, variants interleaved step by step")
    times = time_interleaved(variants, train_batches, args.rounds, args.steps, args.time_limit)
    per_round, per_step, per_cpu = times["round"], times["step"], times["cpu"]

    base = per_round["lora"]
    failed = []
    print()
    print(
        "| variant | what | wall: median ratio over rounds | min-max over rounds "
        "| wall: paired per-step median | CPU time: paired per-step median | target | result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        if name == "lora":
            print(f"| lora | {DESCRIPTIONS[name]} | 1.000x | - | - | - | - | - |")
            continue
        ratios = [t / b for t, b in zip(per_round[name], base)]
        paired = statistics.median(t / b for t, b in zip(per_step[name], per_step["lora"]))
        cpu = statistics.median(t / b for t, b in zip(per_cpu[name], per_cpu["lora"]))
        med = statistics.median(ratios)
        target = TARGETS[name]
        ok = med <= target
        if not ok:
            failed.append(name)
        print(
            f"| {name} | {DESCRIPTIONS[name]} | {med:.3f}x | {min(ratios):.3f}-{max(ratios):.3f} "
            f"| {paired:.3f}x | {cpu:.3f}x | <= {target:.2f}x | {'PASS' if ok else 'FAIL'} |"
        )
    print(
        "PASS/FAIL uses the wall-clock median over rounds; the CPU-time column (process time, "
        "all threads) is less sensitive to other jobs on the machine."
    )
    med_base = statistics.median(base)
    print(
        f"\n(context only, not a claim: median LoRA step {1e3 * med_base:.0f} ms on this machine)"
    )
    if failed:
        print(f"targets missed: {', '.join(failed)} (see --profile {' '.join(failed)})")
    if args.quick:
        print("--quick is a smoke run: 3 rounds cannot resolve a 3% target, verdicts indicative")
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
