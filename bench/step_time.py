"""Step time of DiffoRA's training steps relative to a plain peft LoRA step, side by side.

Four models are built in one process from the same pretrained backbone (all-MiniLM-L6-v2, LoRA
rank 8 on the same 36 candidate modules: q, k, v, o, ffn_in, ffn_out of 6 layers):

* ``lora``   -- plain peft LoRA (``get_peft_model``) + ``torch.optim.AdamW``: the baseline;
* ``gated``  -- DiffoRA weight step: ``TrainingModule.forward`` sets the (detached) DAM gates in
  ``LoraGates``, then forward + backward + AdamW (from ``TrainingModule.configure_optimizers``);
* ``search`` -- a full search step: the weight step above, then
  ``TrainingModule._architecture_step`` on another batch (gates with grad, backward only into
  ``dam.logits``, Adam on the logits);
* ``post``   -- a weight step after ``TrainingModule.discretize`` at budget 0.5 (``apply_mask``
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
import json
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
from omegaconf import DictConfig, open_dict
from peft import LoraConfig, get_peft_model

from diffora_lab import backbones, methods
from diffora_lab.config import optim_settings, search_settings
from diffora_lab.dam import Mask
from diffora_lab.module import TrainingModule
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


def compose_config(
    rank: int, budget: float, method: str = "diffora", backbone: str = "minilm_l6"
) -> DictConfig:
    """The project's own composed config (conf/config.yaml); MiniLM backbone by default."""
    overrides = [
        f"backbone={backbone}",
        "task=synthetic",
        f"method={method}",
        "logger=none",
        f"rank={rank}",
        f"budget={budget}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def make_batches(
    n: int, batch: int, seq: int, vocab: int, seed: int = 0, device: str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """Random token ids (fixed seed); shapes are what matters for step time."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=gen)
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


def _load_backbone(cfg: DictConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # same classifier-head init for every variant
    vocab = int(cfg.bench.vocab) if cfg.backbone.get("config") is not None else None
    return backbones.load_backbone(cfg.backbone, num_labels=2, vocab_size=vocab)


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
        get_task("synthetic"),
        candidates,
        optim_settings(cfg),
        search_settings(cfg),
        dam=built.dam,
        mask=built.mask,
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


def build_all(args: argparse.Namespace, names=VARIANTS) -> tuple[dict[str, Variant], list, list]:
    """Builds the variants named; ``args`` holds batch, seq, rank, budget and optionally
    backbone (a conf/backbone option), vocab (for config-built backbones) and device."""
    cfg = compose_config(args.rank, args.budget, backbone=getattr(args, "backbone", "minilm_l6"))
    device = getattr(args, "device", "cpu")
    vocab = getattr(args, "vocab", None) or int(cfg_vocab(cfg))
    with open_dict(cfg):
        cfg.bench = {"device": device, "vocab": vocab}
    train_batches = make_batches(4, args.batch, args.seq, vocab, seed=1, device=device)
    search_batches = make_batches(4, args.batch, args.seq, vocab, seed=2, device=device)
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


def cuda_step_memory(variants: dict[str, Variant], batch: dict, run: Callable) -> dict[str, int]:
    """Peak CUDA memory of one step of each variant above what was allocated before it.

    Everything resident (all variants' weights, optimizer states) is in the baseline, so the
    number is the step's own: activations, gradients and temporaries.
    """
    out = {}
    for name, variant in variants.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(variant, batch)
        out[name] = torch.cuda.max_memory_allocated() - before
    return out


def time_interleaved(
    variants: dict[str, Variant],
    batches: list,
    rounds: int,
    steps: int,
    time_limit: float = float("inf"),
    run: Callable[[Variant, dict], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of each variant, wall-clock and process CPU time.

    Returns ``{"round": {variant: [mean wall s/step per round]}, "step": {variant: [wall s of
    each step]}, "cpu": {variant: [CPU s of each step]}}``. Within a round the variants alternate
    step by step (``lora, gated, search, post, lora, ...``), the order rotating each round, so a
    burst of load from other jobs hits all of them alike. Rounds stop early (after at least 3)
    when the next one would end past ``time_limit`` seconds.
    """
    run = run or step_runner()
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
                run(variants[name], batch)
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


def profile_variant(variant: Variant, batches: list, run: Callable, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    for i in range(2):
        run(variant, batches[i % len(batches)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3):
            with record_function(f"{variant.name}_step"):
                run(variant, batches[i % len(batches)])
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
        "--backbone",
        default="minilm_l6",
        help="a conf/backbone option (deberta_v3_base_random: DeBERTa-v3-base, random weights)",
    )
    parser.add_argument(
        "--vocab", type=int, help="vocab size of a config-built backbone (default: the tokenizer's)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--precision",
        choices=("32-true", "bf16-mixed"),
        help="default: bf16-mixed on cuda, 32-true on cpu (what the framework's Trainer picks)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
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
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {args.backbone}, "
        f"batch {args.batch}, seq {args.seq}, rank {args.rank}, budget {args.budget}, "
        f"{args.device} {torch.cuda.get_device_name() if cuda else ''} {args.precision}"
    )
    if args.profile:
        names = tuple(args.profile)
    else:
        names = ("lora", *[n for n in VARIANTS[1:] if n in args.variants])
    variants, train_batches, _ = build_all(args, names)
    for v in variants.values():
        print(f"  {v.name:7s} {DESCRIPTIONS[v.name]:34s} {v.info}")
    run = step_runner(args.device, args.precision)
    if args.profile:
        for name in names:
            profile_variant(variants[name], train_batches, run)
        return 0

    for v in variants.values():
        for i in range(args.warmup):
            run(v, train_batches[i % len(train_batches)])
    memory = cuda_step_memory(variants, train_batches[0], run) if cuda else {}
    print(f"timing: {args.rounds} rounds x {args.steps} steps, variants interleaved step by step")
    times = time_interleaved(variants, train_batches, args.rounds, args.steps, args.time_limit, run)
    per_round, per_step, per_cpu = times["round"], times["step"], times["cpu"]

    base = per_round["lora"]
    failed = []
    results: dict[str, dict] = {}
    print()
    print(
        "| variant | what | wall: median ratio over rounds | min-max over rounds "
        "| wall: paired per-step median | CPU time: paired per-step median | target | result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        results[name] = {
            "samples_per_s": args.batch / statistics.median(per_step[name]),
            "step_peak_mib": memory.get(name, 0) / 2**20 if cuda else None,
        }
        if name == "lora":
            results[name]["ratio"] = 1.0
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
        results[name].update(
            ratio=med, ratio_min=min(ratios), ratio_max=max(ratios), paired=paired, target=target
        )
        print(
            f"| {name} | {DESCRIPTIONS[name]} | {med:.3f}x | {min(ratios):.3f}-{max(ratios):.3f} "
            f"| {paired:.3f}x | {cpu:.3f}x | <= {target:.2f}x | {'PASS' if ok else 'FAIL'} |"
        )
    print(
        "PASS/FAIL uses the wall-clock median over rounds; the CPU-time column (process time, "
        "all threads) is less sensitive to other jobs on the machine."
    )
    print("\n| variant | train samples/s (median step) | vs lora |" + (" step peak MiB |" * cuda))
    print("|---|---|---|" + "---|" * cuda)
    lora_rate = results["lora"]["samples_per_s"]
    for name, r in results.items():
        row = f"| {name} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / lora_rate:.3f}x |"
        print(row + (f" {r['step_peak_mib']:.0f} |" if cuda else ""))
    print(
        "(the search step also processes one search batch per train batch; samples/s counts "
        "train samples. Absolute rates are this machine's, for context only.)"
    )
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("json", "profile")}
        meta["torch"] = torch.__version__
        meta["gpu"] = torch.cuda.get_device_name() if cuda else None
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": meta, "variants": results}, indent=1) + "\n")
    if failed:
        print(f"targets missed: {', '.join(failed)} (see --profile {' '.join(failed)})")
    if args.quick:
        print("--quick is a smoke run: 3 rounds cannot resolve a 3% target, verdicts indicative")
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
