#!/usr/bin/env bash
# The GPU check, as one short script (about 3 minutes on one H200, plus model start-up):
#  1. bench/step_time.py on CUDA: samples/s and time ratios of DiffoRA's gated weight step, search
#     step and post-discretization step against a plain peft LoRA step, DeBERTa-v3-base-sized
#     (conf/backbone/deberta_v3_base_random.yaml, 128,100-token vocab, random weights), bf16-mixed,
#     batch 32, seq 256, rank 8, budget 0.5, plus each step's peak CUDA memory;
#  2. the real pipeline end to end on the GPU (Lightning Trainer, precision auto = bf16-mixed,
#     search, discretization, checkpoint, adapter export) for diffora and lora on the same
#     backbone and the synthetic task; their results.json files are copied to OUTDIR.
# Usage: bash bench/gpu_check.sh [OUTDIR]       (default OUTDIR: bench/results/gpu)
set -uo pipefail
out=${1:-bench/results/gpu}
mkdir -p "$out"
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', \
lightning.__version__)"

"$PY" bench/step_time.py --device cuda --backbone deberta_v3_base_random --vocab 128100 \
  --batch 32 --seq 256 --rank 8 --budget 0.5 --rounds 9 --steps 4 --warmup 3 --time-limit 150 \
  --json "$out/step_time_gpu.json"
echo "[gpu_check] step_time exit status $?"

runs=$(mktemp -d)
for method in diffora lora; do
  start=$(date +%s)
  "$PY" -m diffora_lab backbone=deberta_v3_base_random task=synthetic method=$method \
    logger=csv train.max_steps=200 train.batch_size=32 train.val_every=100 train.ckpt_every=200 \
    dam.warmup_steps=10 "hydra.run.dir=$runs/$method" "data.cache_dir=$runs/cache"
  status=$?
  echo "[gpu_check] e2e $method exit status $status, $(( $(date +%s) - start )) s"
  [ -f "$runs/$method/results.json" ] && cp "$runs/$method/results.json" "$out/e2e_$method.json"
done
ls -la "$out"
