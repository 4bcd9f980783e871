#!/usr/bin/env bash
# Run one command on every worker of a TPU VM slice (multi-host: each host runs the same program and feeds its
# shard of the global batch; pass --distributed to launch/train.py so that it calls jax.distributed.initialize()).
#
#   launch/tpu/run.sh [--dry-run] TPU_NAME ZONE [PROJECT] -- python launch/train.py --distributed \
#       --config=configs/animatediff_sd15.py:variant=v2 --workdir=gs://bucket/runs/mm_v2
#
# --dry-run prints the gcloud command instead of running it.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE [PROJECT] -- COMMAND..." >&2
  exit 2
fi
name=$1; zone=$2; shift 2
project=()
if [[ "$1" != "--" ]]; then project=(--project="$1"); shift; fi
[[ "$1" == "--" ]] || { echo "expected -- before the command" >&2; exit 2; }
shift
remote="cd ~/vdjax && $(printf '%q ' "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${project[@]}" --worker=all --command="$remote")
if [[ $dry == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
