#!/usr/bin/env bash
# The sd15-scale benchmark on one GPU, in one process: SD1.5's UNet, VAE and text encoder
# and the HPS ViT-H-14 reward, all with random weights (the real FLOPs and memory), at
# 512 x 512 with 30 DDIM steps, CFG 7.5. Our path beside the plain reference: training
# (one optimizer step of 8 samples at micro-batch 1 and 8), per-sample tune (10 x 30
# steps), gradient agreement at fp32, the cost-model floor, ablations. About 5 minutes
# on an H100 (the first run also builds the models into runs/bench-cache/sd15, ~4 GB);
# optional parts are skipped past 7 minutes so the whole stays under 10.
#
#   bash benchmarks/run_sd15.sh                       # the table + runs/bench/sd15.json
#   bash benchmarks/run_sd15.sh --channels-last       # extra bench.py flags pass through
#   PYTHON=/path/to/python bash benchmarks/run_sd15.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "run_sd15.sh: no CUDA GPU visible to $PYTHON (the sd15 scale needs one; try --scale tiny)" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" benchmarks/bench.py --scale sd15 --device cuda "$@"
