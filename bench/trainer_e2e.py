"""End to end on GLUE sentences: our pipeline against transformers' ``Trainer`` with peft LoRA.

What a user runs instead of diffora_lab is ``transformers.Trainer`` on a ``peft`` LoRA model. Both
train the same model (MiniLM-L6 by default) with LoRA rank 8 on the same 36 modules and the same
head, on the same rows (a subset of SST-2 or RTE from ``../shared/data/glue``, else generated
sentences of varied length), batch 32, the same precision (fp32 on CPU, bf16 autocast on a GPU),
lr schedule, clipping and number of steps, with the same two dev evaluations (one at the last
step, one after training). Timed from loading the model to the final dev metrics:

* ``ours``      ``python -m diffora_lab method=lora`` in process (``train.run``), speed-ups off;
* ``ours_fast`` the same with ``data.bucketing=8 train.optimizer=fused`` (+ ``train.compile=true``
  with ``--compile``), the non-finite check deferred (the default);
* ``trainer``   ``Trainer`` + ``get_peft_model`` + ``DataCollatorWithPadding`` (its defaults).

The three alternate (order rotating) for ``--rounds`` rounds after an untimed warm-up round; the
table gives median time ratios, absolute samples/s and a model-FLOP-utilisation estimate: model
FLOPs (4 x linear parameters per real token for a LoRA training step, whose frozen weights need no
weight gradients; 2 x for evaluation; attention's T^2 terms are left out, about 2 % here) over the
wall time, divided by the matmul rate measured on the same device in the same run.

    python bench/trainer_e2e.py                     # SST-2, 60 steps, 3 rounds
    python bench/trainer_e2e.py --task rte --steps 30
    python bench/trainer_e2e.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._steps import add_omp_flag, quiet, reexec_with_omp_policy  # noqa: E402
from diffora_lab import backbones  # noqa: E402
from diffora_lab.tasks import get_task, load_raw  # noqa: E402

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
HEADERS = {
    "sst2": ("SST-2", "sentence\tlabel"),
    "rte": ("RTE", "index\tsentence1\tsentence2\tlabel"),
}


def write_glue_subset(
    task: str, out: Path, n_train: int, n_dev: int, glue: Path = GLUE, seed: int = 0
) -> str:
    """A GLUE folder holding n_train/n_dev rows of the task (real rows when present)."""
    folder, header = HEADERS[task]
    rng = random.Random(seed)
    (out / folder).mkdir(parents=True, exist_ok=True)
    source = glue / folder
    for split, n in (("train", n_train), ("dev", n_dev)):
        path = source / f"{split}.tsv"
        if path.is_file():
            rows = path.read_text().splitlines()[1:]
            rows = rng.sample(rows, min(n, len(rows)))
        else:
            rows = [_generated_row(task, i, rng) for i in range(n)]
        (out / folder / f"{split}.tsv").write_text("\n".join([header, *rows]) + "\n")
    return str(source) if (source / "train.tsv").is_file() else "generated rows"


def _generated_row(task: str, i: int, rng: random.Random) -> str:
    words = "the a film story actor plot is was not very good bad dull fun long short".split()
    text = lambda mean: " ".join(rng.choices(words, k=max(2, int(rng.lognormvariate(mean, 0.6)))))  # noqa: E731
    if task == "sst2":
        return f"{text(2.2)}\t{i % 2}"
    return f"{i}\t{text(3.5)}\t{text(2.3)}\t{('entailment', 'not_entailment')[i % 2]}"


def overrides(args, data_dir: Path, out: Path, fast: bool) -> list[str]:
    steps = args.steps
    common = [
        f"backbone={args.backbone}",
        f"task={args.task}",
        f"task.data_dir={data_dir}",
        "method=lora",
        "logger=none",
        f"train.max_steps={steps}",
        f"train.batch_size={args.batch}",
        f"train.val_every={steps}",
        f"train.ckpt_every={steps}",
        f"data.cache_dir={out.parent / 'cache'}",
        "ckpt_path=null",
    ]
    if fast:
        common += ["data.bucketing=8", f"train.optimizer={args.optimizer}"]
        compiled = ["train.compile=true", f"train.compile_backend={args.compile_backend}"]
        common += compiled if args.compile else []
    else:
        common += ["data.bucketing=0", "train.finite_check_every=1", "train.optimizer=default"]
    return common


def run_ours(args, data_dir: Path, out: Path, fast: bool) -> dict:
    from hydra import compose, initialize_config_dir

    from diffora_lab.__main__ import config_dir
    from diffora_lab.train import run

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(args, data_dir, out, fast))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = run(cfg, out)
    return {"seconds": time.perf_counter() - t0, "metric": results["metrics"]["val/accuracy"]}


def run_trainer(args, data_dir: Path, out: Path) -> dict:
    """transformers.Trainer with a peft LoRA model: what a user writes without diffora_lab."""
    from hydra import compose, initialize_config_dir
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from diffora_lab.__main__ import config_dir

    t0 = time.perf_counter()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"backbone={args.backbone}", "method=lora"])
    spec = get_task(args.task)
    raw = load_raw(spec, data_dir)
    tokenizer = backbones.load_tokenizer(cfg.backbone)
    max_length = 64 if args.task == "sst2" else 128

    def dataset(examples) -> list[dict]:  # a plain list: no dependency on `datasets`
        texts = [examples.text_a] + ([] if examples.text_b is None else [examples.text_b])
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        columns = {**encoded, "labels": list(examples.labels)}
        return [dict(zip(columns, row)) for row in zip(*columns.values())]

    torch.manual_seed(0)
    model = backbones.load_backbone(cfg.backbone, spec.num_labels, vocab_size=len(tokenizer))
    names = backbones.find_candidates(
        model, str(cfg.backbone.layer_pattern), dict(cfg.backbone.module_types)
    )
    lora = LoraConfig(
        r=8,
        lora_alpha=float(cfg.method.lora_alpha),
        lora_dropout=float(cfg.method.lora_dropout),
        target_modules=[c.name for c in names],
        modules_to_save=list(cfg.backbone.head_modules),
        task_type="SEQ_CLS",
    )
    model = get_peft_model(model, lora)
    cuda = torch.device(args.device).type == "cuda"
    training = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=128,
        learning_rate=float(cfg.train.lr),
        weight_decay=float(cfg.train.weight_decay),
        warmup_steps=max(1, round(float(cfg.train.warmup_ratio) * args.steps)),
        max_grad_norm=float(cfg.train.grad_clip),
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=args.steps,
        logging_steps=int(cfg.train.log_every),
        save_strategy="no",
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        seed=int(cfg.seed),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    def accuracy(prediction) -> dict:
        return {
            "accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
        }

    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=dataset(raw.train),
        eval_dataset=dataset(raw.dev[spec.dev_splits[0]]),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
        metrics = trainer.evaluate()
    return {"seconds": time.perf_counter() - t0, "metric": metrics["eval_accuracy"]}


def model_flops(args, data_dir: Path) -> tuple[float, int]:
    """Model FLOPs of one run (train steps + two dev passes) and the linear parameter count."""
    from hydra import compose, initialize_config_dir

    from diffora_lab.__main__ import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"backbone={args.backbone}"])
    tokenizer = backbones.load_tokenizer(cfg.backbone)
    spec = get_task(args.task)
    raw = load_raw(spec, data_dir)
    model = backbones.load_backbone(cfg.backbone, spec.num_labels, vocab_size=len(tokenizer))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    max_length = 64 if args.task == "sst2" else 128

    def tokens(examples) -> list[int]:
        texts = (
            (examples.text_a,) if examples.text_b is None else (examples.text_a, examples.text_b)
        )
        return [
            len(ids)
            for ids in tokenizer(*texts, truncation=True, max_length=max_length)["input_ids"]
        ]

    train_mean = statistics.mean(tokens(raw.train))
    dev_total = sum(tokens(raw.dev[spec.dev_splits[0]]))
    flops = 4 * linear * train_mean * args.steps * args.batch + 2 * 2 * linear * dev_total
    return flops, linear


def matmul_rate(device: str, seconds: float = 2.0) -> float:
    """FLOP/s of a large matmul on this device (fp32 on CPU, bf16 on CUDA): the MFU yardstick."""
    cuda = torch.device(device).type == "cuda"
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    rates = []
    for _ in range(3):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            count += 1
            if cuda:
                torch.cuda.synchronize()
        rates.append(2 * n**3 * count / (time.perf_counter() - t0))
    return max(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(HEADERS), default="sst2")
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--dev-rows", type=int, default=872)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--glue", type=Path, default=GLUE, help="GLUE folder (SST-2/, RTE/)")
    parser.add_argument("--optimizer", choices=("fused", "foreach"), default="fused")
    parser.add_argument("--compile", action="store_true", help="ours_fast also compiles layers")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--compile-backend", default="inductor", help="aot_eager: trace only (quick dry runs)"
    )
    parser.add_argument("--time-limit", type=float, default=float("inf"), help="s in all")
    add_omp_flag(parser)
    args = parser.parse_args(argv)
    reexec_with_omp_policy(args.omp_wait_policy)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    quiet()
    cuda = torch.device(args.device).type == "cuda"
    if cuda != torch.cuda.is_available():
        parser.error(f"--device {args.device}: run where that device is (and only that one)")
    work = Path(tempfile.mkdtemp(prefix="trainer_e2e_"))
    data_dir = work / "glue"
    source = write_glue_subset(args.task, data_dir, args.train_rows, args.dev_rows, args.glue)
    flops, linear = model_flops(args, data_dir)
    peak = matmul_rate(args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; "
        f"{args.backbone}, {args.task} ({source}: {args.train_rows} train / {args.dev_rows} dev "
        f"rows), {args.steps} steps x batch {args.batch}, 2 dev passes; {linear / 1e6:.1f}M "
        f"linear params, {flops / 1e12:.2f} TFLOP of model work per run; measured matmul rate "
        f"{peak / 1e9:.0f} GFLOP/s"
    )
    runners = {
        "ours": lambda out: run_ours(args, data_dir, out, fast=False),
        "ours_fast": lambda out: run_ours(args, data_dir, out, fast=True),
        "trainer": lambda out: run_trainer(args, data_dir, out),
    }
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    for r in range(args.rounds + 1):
        if r >= 2 and (time.perf_counter() - start) * (r + 1) / r > args.time_limit:
            print(f"  stopping after {r - 1} rounds: --time-limit {args.time_limit:.0f}s")
            break
        order = names[r % 3 :] + names[: r % 3]
        line = []
        for name in order:
            result = runners[name](work / f"{name}_{r}")
            metrics[name] = result["metric"]
            line.append(f"{name}={result['seconds']:.1f}s")
            if r > 0:
                times[name].append(result["seconds"])
        print(f"  {'warm-up' if r == 0 else f'round {r}/{args.rounds}'}: " + "  ".join(line))
    peak = max(peak, matmul_rate(args.device))  # the better of before and after: less load
    samples = args.steps * args.batch
    print("\n| pipeline | time vs trainer (median) | min-max | samples/s | MFU | dev accuracy |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times["trainer"])]
        seconds = statistics.median(times[name])
        results[name] = {
            "time_vs_trainer": statistics.median(ratios),
            "speedup_vs_trainer": statistics.median(
                b / t for t, b in zip(times[name], times["trainer"])
            ),
            "samples_per_s": samples / seconds,
            "mfu": flops / seconds / peak,
            "dev_accuracy": metrics[name],
        }
        print(
            f"| {name} | {statistics.median(ratios):.3f}x | {min(ratios):.3f}-{max(ratios):.3f} | "
            f"{samples / seconds:.1f} | {flops / seconds / peak:.2%} | {metrics[name]:.4f} |"
        )
    print(
        "(end to end: model load, tokenization, training, two dev passes. Below 1x is faster. "
        "samples/s counts training samples over the whole wall time; MFU = model FLOP/s over the "
        "measured matmul rate. Absolute rates are this machine's.)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: str(v) for k, v in vars(args).items() if k != "json"}
        meta.update(matmul_flops=peak, model_flops=flops, source=source)
        args.json.write_text(json.dumps({"args": meta, "pipelines": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
