"""Peak memory of a DiffoRA search step and of a post-discretization step vs a peft LoRA step.

The models and steps are the ones of ``bench/step_time.py`` (``bench/_steps.py``; ``--grid
encoder``: MiniLM-L6, rank 8 on the 36 candidate modules, batch 32, seq 64; ``--grid decoder``:
a Llama with SmolLM2-135M's layer shape, 4 layers, 28 modules, the causal-LM loss, batch 8; the
framework's ``TrainingModule`` for the DiffoRA variants, plain peft + AdamW for the baseline),
built side by side in one process.

How memory is measured (CPU, no caching allocator):

1. **Step peak** (the headline): one step runs under ``torch.profiler`` with
   ``profile_memory=True``, which records every CPU allocation and free of the step with its
   timestamp. The running sum of those events, in time order, is the memory held by the step
   above what was live when it began; its maximum is the step's peak (activations kept for
   backward, gradients, temporaries). For the search step the window spans the weight step *and*
   the architecture step, so its peak is the larger of the two.
2. **Resident** bytes at the start of the step: the unique storages of the model's parameters and
   buffers plus the optimizer states (after warm-up steps, so Adam's moments exist). Peak total =
   resident + step peak.
3. Cross-check: **saved activations**, the bytes of the distinct tensors autograd saves for
   backward during the step's forward pass(es) (``torch.autograd.graph.saved_tensors_hooks``;
   parameters excluded; max over the step's forwards).

Why not ``ru_maxrss``: it is a process-wide high-water mark, set by whatever ran first
(checkpoint loading, the other variants), so it cannot compare variants side by side in one
process and, even with a fresh process per variant, mixes loading peaks into a step's.

Run from the repository root::

    python bench/memory.py                 # batch 32, seq 64
    python bench/memory.py --quick         # batch 8
    python bench/memory.py --grid decoder  # the Llama-style grid (batch 8, seq 64)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._steps import (  # noqa: E402
    DESCRIPTIONS,
    GRIDS,
    BenchModule,
    Variant,
    add_omp_flag,
    build_all,
    quiet,
    reexec_with_omp_policy,
)

VARIANTS = ("lora", "gated", "search", "post")
MIB = 2**20


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def resident_bytes(variant: Variant) -> int:
    """Unique storages of parameters, buffers and optimizer state (gradients are None here)."""
    model = variant.model
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    opts = []
    if isinstance(model, BenchModule):
        opts.append(model.optimizers())
        if model.arch_optimizer is not None:
            opts.append(model.arch_optimizer)
    else:
        opts.append(variant.optimizer)
    for opt in opts:
        for state in opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        ptr, nbytes = _storage_key(t)
        seen[ptr] = nbytes
        if t.grad is not None:
            ptr, nbytes = _storage_key(t.grad)
            seen[ptr] = nbytes
    return sum(seen.values())


def measure_step(variant: Variant, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(step peak, saved activations) in bytes, both from one step.

    Step peak: the maximum running sum of the step's CPU allocation events (minus frees), in
    time order, i.e. the most memory held above what was live when the step began. Saved: per
    forward pass, the distinct non-parameter storages autograd saves for backward; the max over
    the step's forwards (the search step has two). The pack hook only records pointers, so it
    allocates nothing the profiler would count.
    """
    from torch.profiler import ProfilerActivity, profile

    model = variant.model
    inner = model.model if isinstance(model, BenchModule) else model
    params = {_storage_key(p)[0] for p in inner.parameters()}
    current: dict[int, int] = {}
    per_forward: list[int] = []

    def pack(t: torch.Tensor):
        ptr, nbytes = _storage_key(t)
        if ptr not in params and nbytes:
            current[ptr] = nbytes
        return t

    def flush(*_):  # a forward pass begins at the input embeddings
        if current:
            per_forward.append(sum(current.values()))
            current.clear()

    handle = inner.get_input_embeddings().register_forward_pre_hook(flush)
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            variant.step(batch)
    finally:
        handle.remove()
    flush()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak, max(per_forward)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="encoder")
    parser.add_argument("--batch", type=int, help="default: the grid's (encoder 32, decoder 8)")
    parser.add_argument("--seq", type=int, help="default: the grid's (64)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2, help="measurements per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 round")
    add_omp_flag(parser)
    args = parser.parse_args(argv)
    reexec_with_omp_policy(args.omp_wait_policy)
    grid = GRIDS[args.grid]
    if args.quick:
        args.batch, args.rounds = args.batch or min(8, grid.batch), 1
    args.batch, args.seq = args.batch or grid.batch, args.seq or grid.seq
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet()
    print(
        f"torch {torch.__version__}; grid {args.grid} ({grid.about}), batch {args.batch}, "
        f"seq {args.seq}, "
        f"rank {args.rank}, budget {args.budget}"
    )
    variants, batches, _ = build_all(args, VARIANTS)
    for v in variants.values():
        print(f"  {v.name:7s} {DESCRIPTIONS[v.name]:34s} {v.info}")
        for i in range(2):  # optimizer state exists from here on
            v.step(batches[i % len(batches)])

    peaks: dict[str, list[int]] = {n: [] for n in variants}
    saved: dict[str, list[int]] = {n: [] for n in variants}
    for r in range(args.rounds):
        order = list(variants)[r % len(variants) :] + list(variants)[: r % len(variants)]
        for name in order:
            batch = batches[r % len(batches)]
            peak, sav = measure_step(variants[name], batch)
            peaks[name].append(peak)
            saved[name].append(sav)
    resident = {n: resident_bytes(v) for n, v in variants.items()}

    def worst(values: list[int]) -> int:
        return max(values)

    base_peak = worst(peaks["lora"])
    base_saved = worst(saved["lora"])
    base_total = resident["lora"] + base_peak
    print(
        "\nstep peak = max running sum of the step's CPU allocations minus frees "
        "(torch.profiler profile_memory), above what was live at step start; "
        "total = resident (params, buffers, optimizer state) + step peak; "
        "saved = bytes autograd saves for backward in one forward (cross-check). "
        f"Worst of {args.rounds} round(s). A profiler warning about a 'block of unknown size' "
        "means a tensor from before the step was freed in it; that free is not counted, which "
        "can only overstate a peak.\n"
    )
    print(
        "| variant | what | step peak MiB | ratio | saved act. MiB | ratio "
        "| resident MiB | total MiB | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        peak, sav = worst(peaks[name]), worst(saved[name])
        total = resident[name] + peak
        print(
            f"| {name} | {DESCRIPTIONS[name]} | {peak / MIB:.1f} | {peak / base_peak:.3f}x "
            f"| {sav / MIB:.1f} | {sav / base_saved:.3f}x | {resident[name] / MIB:.1f} "
            f"| {total / MIB:.1f} | {total / base_total:.3f}x |"
        )
    spread = {n: round((max(v) - min(v)) / MIB, 2) for n, v in peaks.items()}
    print(f"\nspread of the step peak over rounds (MiB): {spread}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
