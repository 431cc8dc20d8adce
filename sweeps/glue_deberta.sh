#!/usr/bin/env bash
# Reproduces the AdaLoRA-protocol GLUE table on DeBERTa-v3-base (docs/METHOD.md, "Reference
# numbers"): 8 tasks x 5 seeds x {LoRA r=8, AdaLoRA (target r=8), DiffoRA at matched params
# (budget 0.5, rank matched to LoRA r=8)}, in the same harness, then one report.
#
#   bash sweeps/glue_deberta.sh                       # all tasks, here, one job after another
#   TASKS="rte mrpc" SEEDS=1,2 bash sweeps/glue_deberta.sh
#   LAUNCHER="hydra/launcher=slurm hydra.launcher.partition=gpu" bash sweeps/glue_deberta.sh
#   EXTRA="backbone.path=/models/deberta-v3-base task.data_dir=/data/glue" bash sweeps/glue_deberta.sh
#
# Estimated GPU time per task on one modern GPU (H100/A100-class, bf16), per seed, all three
# methods together. Basis: on one H200 a LoRA step of a DeBERTa-v3-base-sized model at batch 32,
# seq 256, bf16 took ~0.1 s (9.6 steps/s), a DiffoRA search step 2.0x and a post-discretization
# step 0.70x of that (measured: BENCHMARKS.md, "GPU step throughput"); DiffoRA searches for 30 %
# of the steps, AdaLoRA is taken as ~1.1x; longer max lengths (320, 512) cost proportionally
# more. The totals below are estimates from those rates, not timed runs:
#   mnli  85,903 steps  ~8.5 h      qqp   56,851 steps  ~6 h (max length 320)
#   qnli  16,366 steps  ~2.5 h (512) sst2  50,511 steps  ~4 h
#   cola   6,679 steps  ~0.5 h       rte    3,890 steps  ~0.4 h (320)
#   mrpc   3,438 steps  ~0.3 h (320) stsb   4,491 steps  ~0.4 h
# x 5 seeds: ~110 GPU hours in all, most of it MNLI, QQP and SST-2.
set -euo pipefail
TASKS=${TASKS:-"rte mrpc stsb cola sst2 qnli qqp mnli"}
SEEDS=${SEEDS:-1,2,3,4,5}
LAUNCHER=${LAUNCHER:-}
EXTRA=${EXTRA:-}
ROOT=${ROOT:-multirun/glue_deberta}

for task in $TASKS; do
  python -m diffora_lab -m +experiment=deberta_${task} $LAUNCHER $EXTRA \
    method=lora,adalora rank=8 seed=$SEEDS \
    logger.group=glue_deberta hydra.sweep.dir=$ROOT/$task/baselines
  python -m diffora_lab -m +experiment=deberta_${task} $LAUNCHER $EXTRA \
    method=diffora match=lora_r8 budget=0.5 seed=$SEEDS \
    logger.group=glue_deberta hydra.sweep.dir=$ROOT/$task/diffora
done
python -m diffora_lab.report "$ROOT" --out "$ROOT/report"
