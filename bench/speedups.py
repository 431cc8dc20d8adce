"""Each speed-up setting on its own and all together, against a plain peft LoRA step, side by side.

The step is DiffoRA's weight step during the search (``TrainingModule.forward`` with the DAM gates,
the non-finite check, backward, AdamW), as ``bench/step_time.py`` builds it, on MiniLM-L6 (rank 8,
36 adapted modules) and batches of SST-2 sentences (``../shared/data/glue/SST-2`` when present,
else generated lengths with SST-2's spread). Variants:

* ``peft``      plain peft LoRA + AdamW on random batches padded to their longest row (baseline);
* ``eager``     our step as it runs by default with the speed-ups off (a per-step finite check);
* ``bucketing`` ``data.bucketing=8``: batches of similar length, widths in multiples of 8;
* ``nosync``    ``train.finite_check_every=10``: the finite check reads the device every 10 steps;
* ``fused``     ``train.optimizer=fused`` (``--optimizer foreach`` to try the other kernel);
* ``compile``   ``train.compile=true``: each backbone layer compiled (inductor);
* ``nodrop``    ``method.lora_dropout=0``: peft skips the dropout copy of each adapted input
  (changes the method's regularisation: not part of ``all``);
* ``all_eager`` bucketing + nosync + fused (everything but compile: where compiling costs more
  than a short run gains, e.g. on a CPU);
* ``all``       bucketing + nosync + fused + compile.

Every variant reads a whole epoch of the same examples per round (its own batch stream: random
or bucketed), step by step interleaved with the others, the order rotating each round; the table
gives the median over rounds of each variant's epoch time relative to ``peft`` and to ``eager``
(equal batch sizes, so a time ratio is an inverse samples/s ratio), and each stream's padding
waste. Compiled variants see every batch shape during the untimed warm-up epoch.

    python bench/speedups.py                      # 5 rounds, batch 32, 512 SST-2 sentences
    python bench/speedups.py --quick              # smoke: 2 rounds, no compile
    python bench/speedups.py --device cuda        # on a GPU (bf16-mixed)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._steps import (  # noqa: E402
    CONF_DIR,
    BenchModule,
    Variant,
    add_omp_flag,
    build_diffora,
    build_lora,
    quiet,
    reexec_with_omp_policy,
    step_runner,
)
from diffora_lab import backbones  # noqa: E402
from diffora_lab.data import PadCollator, ResumableBatchSampler, TokenizedSplit  # noqa: E402
from diffora_lab.speed import compile_layers  # noqa: E402

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
VARIANTS = (
    "peft",
    "eager",
    "bucketing",
    "nosync",
    "fused",
    "compile",
    "nodrop",
    "all_eager",
    "all",
)
SETTINGS = {  # variant -> (bucketing, finite_check_every, optimizer, compile, lora_dropout)
    "eager": (0, 1, "default", False, None),
    "bucketing": (8, 1, "default", False, None),
    "nosync": (0, 10, "default", False, None),
    "fused": (0, 1, "fused", False, None),
    "compile": (0, 1, "default", True, None),
    "nodrop": (0, 1, "default", False, 0.0),
    "all_eager": (8, 10, "fused", False, None),
    "all": (8, 10, "fused", True, None),
}


def sentences(n: int, glue: Path = GLUE, seed: int = 0) -> tuple[list[str], str]:
    """n SST-2 training sentences (or generated ones with a similar length spread)."""
    rng = random.Random(seed)
    path = glue / "SST-2" / "train.tsv"
    if path.is_file():
        lines = path.read_text().splitlines()[1:]
        return [line.split("\t")[0] for line in rng.sample(lines, n)], str(path)
    words = "the a film is not very good bad story acting fun dull long".split()
    lengths = [min(60, max(2, int(rng.lognormvariate(2.2, 0.7)))) for _ in range(n)]
    return [" ".join(rng.choices(words, k=k)) for k in lengths], "generated (lognormal lengths)"


def batch_streams(
    texts: list[str], tokenizer, batch: int, max_length: int, device: str
) -> dict[int, list[dict[str, torch.Tensor]]]:
    """One epoch of batches per bucket width (0: random batches, dynamic padding)."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    labels = [i % 2 for i in range(len(texts))]
    split = TokenizedSplit({**{k: encoded[k] for k in encoded}, "labels": labels})
    streams = {}
    for width in (0, 8):
        sampler = ResumableBatchSampler(
            len(split), batch, seed=0, lengths=split.lengths() if width else None, bucket=width
        )
        collate = PadCollator(tokenizer.pad_token_id, False, width, max_length)
        it = iter(sampler)
        stream = [collate([split[i] for i in next(it)]) for _ in range(sampler.per_epoch)]
        streams[width] = [{k: v.to(device) for k, v in b.items()} for b in stream]
    return streams


def padding_waste(stream: list[dict[str, torch.Tensor]]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in stream)
    return 1 - real / sum(b["input_ids"].numel() for b in stream)


def compose_cfg(args: argparse.Namespace, dropout: float | None, optimizer: str, every: int):
    overrides = [
        f"backbone={args.backbone}",
        "task=synthetic",
        "method=diffora",
        "logger=none",
        f"rank={args.rank}",
        f"train.optimizer={optimizer}",
        f"train.finite_check_every={every}",
    ]
    if dropout is not None:
        overrides.append(f"method.lora_dropout={dropout}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.bench = {"device": args.device, "vocab": args.vocab}
    return cfg


def our_step(module: BenchModule, batch: dict[str, torch.Tensor]) -> None:
    """``TrainingModule.training_step``'s weight step (accumulate 1, no clipping or logging)."""
    optimizer = module.optimizers()
    loss = module(batch).loss
    module._check_finite(loss, "weight")
    module.manual_backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    module.step = (module.step + 1) % 50  # stay in the search (the step sets tau and the lr)
    if module.step % module.optim.finite_check_every == 0:
        module.check_finite()


def build(name: str, args: argparse.Namespace, search_batches: list) -> tuple[Variant, int]:
    """A variant and the bucket width of the batches it reads."""
    if name == "peft":
        cfg = compose_cfg(args, None, "default", 1)
        return build_lora(cfg), 0
    bucket, every, optimizer, compiled, dropout = SETTINGS[name]
    if optimizer != "default":
        optimizer = args.optimizer
    cfg = compose_cfg(args, dropout, optimizer, every)
    module, _ = build_diffora(cfg, search_batches)
    module.optim = replace(module.optim, finite_check_every=every)
    if compiled:
        pattern = str(cfg.backbone.layer_pattern)
        compile_layers(module.model, pattern, args.compile_backend, args.compile_mode)
    return Variant(name, module, partial(our_step, module)), bucket


def time_epochs(
    variants, streams, widths, rounds, run, time_limit: float = float("inf")
) -> dict[str, list[float]]:
    """Per round, each variant's time for one epoch of its stream, interleaved step by step.

    Rounds stop early (after at least 2) when the next one would end past ``time_limit`` s.
    """
    names = list(variants)
    start = time.perf_counter()
    times = {n: [] for n in names}
    steps = min(len(s) for s in streams.values())
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        total = dict.fromkeys(names, 0.0)
        for i in range(steps):
            for name in order:
                t0 = time.perf_counter()
                run(variants[name], streams[widths[name]][i])
                total[name] += time.perf_counter() - t0
        for name in names:
            times[name].append(total[name])
        print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n}={total[n]:.2f}s" for n in names))
        elapsed = time.perf_counter() - start
        if r + 1 >= 2 and r + 1 < rounds and elapsed * (r + 2) / (r + 1) > time_limit:
            print(f"  stopping after {r + 1} rounds: --time-limit {time_limit:.0f}s")
            break
    return times


def count_syncs(variants: dict, stream: list, run, steps: int = 20) -> dict[str, float]:
    """Host-device synchronisations per step of each variant (CUDA's sync debug mode)."""
    import warnings

    out = {}
    for name, variant in variants.items():
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(steps):
                run(variant, stream[i % len(stream)])
        torch.cuda.set_sync_debug_mode("default")
        out[name] = sum("synchroniz" in str(w.message) for w in caught) / steps
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--examples", type=int, default=512, help="sentences per epoch")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="minilm_l6", help="a conf/backbone option")
    parser.add_argument("--glue", type=Path, default=GLUE, help="folder holding SST-2/train.tsv")
    parser.add_argument("--optimizer", choices=("fused", "foreach"), default="fused")
    parser.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead (GPU)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=list(VARIANTS[1:]))
    parser.add_argument("--quick", action="store_true", help="2 rounds, 256 sentences, no compile")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--compile-backend", default="inductor", help="aot_eager: trace only (quick dry runs)"
    )
    parser.add_argument("--time-limit", type=float, default=float("inf"), help="s of timing")
    add_omp_flag(parser)
    args = parser.parse_args(argv)
    reexec_with_omp_policy(args.omp_wait_policy)
    if args.quick:
        args.rounds, args.examples = 2, 256
        args.variants = [v for v in args.variants if v not in ("compile", "all")]
    cuda = torch.device(args.device).type == "cuda"
    precision = "bf16-mixed" if cuda else "32-true"
    torch.set_num_threads(args.threads)
    quiet()
    args.vocab = None
    cfg = compose_cfg(args, None, "default", 1)
    tokenizer = backbones.load_tokenizer(cfg.backbone)
    args.vocab = len(tokenizer)  # config-built backbones: the tokenizer's vocabulary
    texts, source = sentences(args.examples, args.glue)
    streams = batch_streams(texts, tokenizer, args.batch, args.max_length, args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; {args.backbone}, rank {args.rank}, batch "
        f"{args.batch}, {len(streams[0])} batches per epoch of {source}, {args.device} {precision}"
    )
    for width, stream in streams.items():
        shapes = sorted({b["input_ids"].shape[1] for b in stream})
        print(
            f"  batches {'random' if not width else f'bucketed by {width}'}: padding waste "
            f"{padding_waste(stream):.1%}, {len(shapes)} widths {shapes}"
        )
    names = ("peft", *[v for v in VARIANTS[1:] if v in args.variants])
    variants, widths = {}, {}
    for name in names:
        variants[name], widths[name] = build(name, args, streams[0][:4])
    run = step_runner(args.device, precision)
    print("warm-up: one untimed epoch per variant (compiles every shape it will see)")
    for name in names:
        t0 = time.perf_counter()
        for batch in streams[widths[name]]:
            run(variants[name], batch)
        print(f"  {name}: {time.perf_counter() - t0:.1f}s")
    syncs = count_syncs(variants, streams[0], run) if cuda else {}
    if syncs:
        print("host-device syncs per step: " + ", ".join(f"{n} {v:.1f}" for n, v in syncs.items()))
    times = time_epochs(variants, streams, widths, args.rounds, run, args.time_limit)
    print("\n| variant | setting | epoch time vs peft (median) | min-max | vs eager | samples/s |")
    print("|---|---|---|---|---|---|")
    results = {}
    steps = min(len(s) for s in streams.values())
    for name in names:
        vs_peft = [t / b for t, b in zip(times[name], times["peft"])]
        vs_eager = [t / b for t, b in zip(times[name], times.get("eager", times["peft"]))]
        rate = steps * args.batch / statistics.median(times[name])
        results[name] = {
            "vs_peft": statistics.median(vs_peft),
            "vs_eager": statistics.median(vs_eager),
            "samples_per_s": rate,
        }
        setting = SETTINGS.get(name, "plain peft")
        print(
            f"| {name} | {setting} | {statistics.median(vs_peft):.3f}x | {min(vs_peft):.3f}-"
            f"{max(vs_peft):.3f} | {statistics.median(vs_eager):.3f}x | {rate:.0f} |"
        )
    print(
        "(time ratios: below 1 is faster; samples/s is this machine's, for context only. "
        "setting = (bucketing, finite_check_every, optimizer, compile, lora_dropout).)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: str(v) for k, v in vars(args).items() if k != "json"}
        waste = {str(w): padding_waste(s) for w, s in streams.items()}
        payload = {"args": meta, "padding_waste": waste, "variants": results, "syncs": syncs}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
