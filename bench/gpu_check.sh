#!/usr/bin/env bash
# The one-GPU check in one command, at most 8 minutes: train MFU per size and remat choice at the largest batch
# that fits, sampling images/s with guidance at batch 64 and 256, and the NPP/NTP wall-clock ratio at GPT-B.
#   bash bench/gpu_check.sh               # on a GPU host with jax[cuda] and this project installed
#   bash bench/gpu_check.sh --dry_run     # tiny models on a CPU: checks the script, not the speed
#   bash bench/gpu_check.sh --sizes=B --remat=full   # any of gpu_check.py's flags (--help)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python bench/gpu_check.py "$@"
