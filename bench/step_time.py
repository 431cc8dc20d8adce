"""Step time of DiffoRA's training steps relative to a plain peft LoRA step, side by side.

Four models are built in one process from the same backbone, LoRA rank 8 on the same candidate
modules; ``--grid encoder`` (default): pretrained all-MiniLM-L6-v2, 36 modules (q, k, v, o,
ffn_in, ffn_out of 6 layers), batch 32; ``--grid decoder``: a Llama with SmolLM2-135M's layer
shape, 4 layers, random weights, the causal-LM loss, 28 modules (q, k, v, o, gate, up, down),
batch 8 (bench/_steps.py, ``GRIDS``):

* ``lora``   -- plain peft LoRA (``get_peft_model``) + ``torch.optim.AdamW``: the baseline;
* ``gated``  -- DiffoRA weight step: ``TrainingModule.forward`` sets the (detached) DAM gates in
  ``LoraGates``, then forward + backward + AdamW (from ``TrainingModule.configure_optimizers``);
* ``search`` -- a full search step: the weight step above, then
  ``TrainingModule._architecture_step`` on another batch (gates with grad, backward only into
  ``dam.logits``, Adam on the logits);
* ``post``   -- a weight step after ``TrainingModule.discretize`` at budget 0.5 (``apply_mask``
  keeps half the adapters, gates folded into B, optimizer rebuilt); the mask is the top half of
  the gates (``Mask.from_scores``) after 3 real search steps on the benchmark's random batches.

Gradient clipping and the lr schedule are left out of every variant. The variants are
interleaved step by step (rotating their order each round); each round gives one time ratio
``variant / lora``, and the table reports the median ratio over rounds. Absolute times are printed
for context only: the machine is shared and noisy, only the side-by-side ratios are claims.
The script re-runs itself under ``OMP_WAIT_POLICY=PASSIVE`` (see :func:`reexec_with_omp_policy`).

Run from the repository root::

    python bench/step_time.py                 # 7 rounds x 2 steps, batch 32, seq 64
    python bench/step_time.py --quick         # a smoke run (~1 min)
    python bench/step_time.py --grid decoder  # the Llama-style grid
    python bench/step_time.py --profile search  # torch.profiler table of one step of a variant
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._steps import (  # noqa: E402
    DESCRIPTIONS,
    GRIDS,
    TARGETS,
    VARIANTS,
    Variant,
    add_omp_flag,
    build_all,
    quiet,
    reexec_with_omp_policy,
    step_runner,
)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--grid", choices=sorted(GRIDS), default="encoder", help="encoder (MiniLM) or decoder")
    add("--steps", type=int, default=2, help="steps per variant per round")
    add("--rounds", type=int, default=7)
    add("--batch", type=int, help="default: the grid's (encoder 32, decoder 8)")
    add("--seq", type=int, help="default: the grid's (64)")
    add("--rank", type=int, default=8)
    add("--budget", type=float, default=0.5)
    add("--warmup", type=int, default=1, help="untimed steps per variant")
    add("--threads", type=int, default=2)
    add("--backbone", help="a conf/backbone option instead of the grid's (e.g. deberta_v3_base)")
    add("--vocab", type=int, help="vocab of a config-built backbone (default: the grid's)")
    add("--device", default="cpu", help="cpu or cuda")
    add("--precision", choices=("32-true", "bf16-mixed"), help="default: bf16-mixed on cuda")
    add("--json", type=Path, help="also write the results to this JSON file")
    add("--time-limit", type=float, default=160.0, help="seconds of timing before rounds stop")
    add("--variants", nargs="+", choices=VARIANTS[1:], default=list(VARIANTS[1:]))
    add("--quick", action="store_true", help="smoke run: 3 rounds x 3 steps, half the batch")
    add("--profile", choices=VARIANTS, nargs="+", help="print a torch.profiler table instead")
    add_omp_flag(parser)
    args = parser.parse_args(argv)
    reexec_with_omp_policy(args.omp_wait_policy)
    grid = GRIDS[args.grid]
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 3, 1
    args.batch = args.batch or (grid.batch // 2 if args.quick else grid.batch)
    args.seq = args.seq or grid.seq
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    cuda = torch.device(args.device).type == "cuda"
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    return args


def ratio_rows(names, times, batch: int, memory: dict, cuda: bool) -> tuple[dict, list[str]]:
    """Prints the ratio table; returns the results per variant and the variants that missed."""
    per_round, per_step, per_cpu = times["round"], times["step"], times["cpu"]
    failed, results = [], {}
    print(
        "\n| variant | what | wall: median ratio over rounds | min-max over rounds "
        "| wall: paired per-step median | CPU time: paired per-step median | target | result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        results[name] = {
            "samples_per_s": batch / statistics.median(per_step[name]),
            "step_peak_mib": memory.get(name, 0) / 2**20 if cuda else None,
        }
        if name == "lora":
            results[name]["ratio"] = 1.0
            print(f"| lora | {DESCRIPTIONS[name]} | 1.000x | - | - | - | - | - |")
            continue
        ratios = [t / b for t, b in zip(per_round[name], per_round["lora"])]
        paired = statistics.median(t / b for t, b in zip(per_step[name], per_step["lora"]))
        cpu = statistics.median(t / b for t, b in zip(per_cpu[name], per_cpu["lora"]))
        med, target = statistics.median(ratios), TARGETS[name]
        if med > target:
            failed.append(name)
        results[name].update(
            ratio=med, ratio_min=min(ratios), ratio_max=max(ratios), paired=paired, target=target
        )
        print(
            f"| {name} | {DESCRIPTIONS[name]} | {med:.3f}x | {min(ratios):.3f}-{max(ratios):.3f} "
            f"| {paired:.3f}x | {cpu:.3f}x | <= {target:.2f}x "
            f"| {'PASS' if med <= target else 'FAIL'} |"
        )
    print(
        "PASS/FAIL uses the wall-clock median over rounds; the CPU-time column (process time, "
        "all threads) is less sensitive to other jobs on the machine."
    )
    return results, failed


def rate_rows(results: dict, cuda: bool) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; grid {args.grid} "
        f"({args.backbone or GRIDS[args.grid].about}), batch {args.batch}, seq {args.seq}, "
        f"rank {args.rank}, budget {args.budget}, "
        f"{args.device} {torch.cuda.get_device_name() if cuda else ''} {args.precision}"
    )
    names = tuple(args.profile or ("lora", *[n for n in VARIANTS[1:] if n in args.variants]))
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
    results, failed = ratio_rows(names, times, args.batch, memory, cuda)
    rate_rows(results, cuda)
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
