#!/usr/bin/env bash
# Fine-tune with `jlora train` on every worker of a Cloud TPU VM pod slice, with one command.
#
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a ./examples/tpu_pod_train.sh \
#       --model /mnt/shared/llama-3.1-8b --data /mnt/shared/train.jsonl --out /mnt/shared/runs/r16 \
#       --mesh fsdp=16 --batch-size 32 --seq-len 4096 --remat --quantize nf4 --steps 1000
#
# Every worker runs the same `python -m jlora.cli train ...`; JLORA_DISTRIBUTED=1 makes the trainer call
# jax.distributed.initialize(), which finds the other workers from the TPU metadata. Paths given to
# --model, --data and --out must exist on every worker, and --out must be one shared directory
# (Filestore/NFS or a mounted bucket): orbax writes each checkpoint from all hosts into it. See
# docs/multihost.md. Plan the mesh first, without the pod:
#   jlora plan --model llama-3.1-8b --topology v5e:4x4 --quantize nf4 --batch-size 32 --seq-len 4096
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM and its zone (required); PROJECT optional
#   SETUP=1          first install jax[tpu] and $JLORA_PIP on every worker
#   JLORA_PIP        what pip installs for jlora (default: "jlora"; e.g. a wheel on the shared disk)
#   DRY_RUN=1        print the gcloud command instead of running it
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
if [[ $# -eq 0 ]]; then
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_ssh+=(--project="$PROJECT")
fi

# The trainer's arguments, quoted once more for the remote shell.
train_args=$(printf '%q ' "$@")
remote="set -euo pipefail; export JLORA_DISTRIBUTED=1 TOKENIZERS_PARALLELISM=false;"
if [[ "${SETUP:-0}" == "1" ]]; then
  remote+=" python3 -m pip install -q -U 'jax[tpu]' $(printf '%q' "${JLORA_PIP:-jlora}");"
fi
remote+=" python3 -m jlora.cli train $train_args"

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${gcloud_ssh[@]}" --command="$remote"
  echo
  exit 0
fi
# --worker=all runs the command on all workers at once; only process 0 prints progress and metrics.
exec "${gcloud_ssh[@]}" --command="$remote"
