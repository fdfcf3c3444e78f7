#!/usr/bin/env bash
# Score (and select) on a Cloud TPU VM slice: every step runs on all workers (--worker=all),
# each process reads only its devices' weight slices, and all write into one store on GCS.
#
#   export TPU_NAME=selectit ZONE=us-east5-a ACCELERATOR=v5p-64 \
#          RUNTIME=v2-alpha-tpuv5 BUCKET=my-bucket \
#          MODEL=models/Llama-2-70b-hf DATA=data/alpaca_data.json RUN=runs/llama2-70b \
#          CONFIG=configs/llama2_70b.py:v5p-64
#   bash launch/tpu_pod.sh all        # create, setup, plan, score, select, delete
#   bash launch/tpu_pod.sh score      # or one step: create|setup|plan|score|select|delete|ssh
#
# MODEL, DATA and RUN are paths inside gs://$BUCKET, which gcsfuse mounts at /mnt/gcs on every
# worker: a shared, resumable score store (rerun `score` after preemption: stored rows are
# skipped) and weights read by byte range, not copied. Runtimes: v4 tpu-ubuntu2204-base,
# v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
set -euo pipefail

: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:?}" "${BUCKET:?}" "${CONFIG:?}" "${MODEL:?}" "${RUN:?}"
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
DATA=${DATA:-}                      # '' = the ShareGPT file the package ships
SPOT=${SPOT:-0}                     # 1 = spot/preemptible capacity
KEEP=${KEEP:-0}                     # 1 = `all` does not delete the slice at the end
EXTRA=${EXTRA:-}                    # more flags for score, e.g. --config.prompts.k=5
GCS=/mnt/gcs
REPO=$(cd "$(dirname "$0")/.." && pwd)

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

create() {  # reuse the slice if it already exists
  if tpu describe "$TPU_NAME" >/dev/null 2>&1; then echo "reusing $TPU_NAME"; return; fi
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
      $([[ $SPOT == 1 ]] && echo --spot)
}

setup() {  # the committed code on every worker, a venv with jax[tpu], gcsfuse mounted
  git -C "$REPO" archive --format=tar.gz -o /tmp/selectit_jax.tar.gz HEAD
  tpu scp /tmp/selectit_jax.tar.gz "$TPU_NAME":~/ --worker=all
  on_all "set -e
    mkdir -p ~/selectit_jax && tar xzf ~/selectit_jax.tar.gz -C ~/selectit_jax
    if ! command -v gcsfuse >/dev/null; then
      export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
      echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
      sudo apt-get update -q && sudo apt-get install -yq gcsfuse python3-venv
    fi
    sudo mkdir -p $GCS && sudo chown \$USER $GCS
    mountpoint -q $GCS || gcsfuse --implicit-dirs $BUCKET $GCS
    [[ -d ~/venv ]] || python3 -m venv ~/venv
    ~/venv/bin/pip install -q -U 'jax[tpu]' -e ~/selectit_jax"
}

score_cmd() {  # $1: module; the same command on every worker (jax.distributed joins them)
  echo "cd ~/selectit_jax && ~/venv/bin/python -m selectit_jax.$1 --config=$CONFIG \
    --config.model.path=$GCS/$MODEL ${DATA:+--config.data.path=$GCS/$DATA} \
    --config.output_dir=$GCS/$RUN --config.distributed.initialize=always $EXTRA"
}

plan() { tpu ssh "$TPU_NAME" --worker=0 --command="cd ~/selectit_jax && ~/venv/bin/python \
    -m selectit_jax.plan --config=$CONFIG --config.model.path=$GCS/$MODEL $EXTRA"; }
score() { on_all "$(score_cmd score) 2>&1 | tee -a ~/score.log"; }
select_() {  # no model: one worker reads every process's shards from the shared store
  tpu ssh "$TPU_NAME" --worker=0 --command="cd ~/selectit_jax && ~/venv/bin/python -m \
    selectit_jax.select --config=configs/select.py --config.scores_dir=$GCS/$RUN \
    --config.output_dir=$GCS/$RUN/selection ${SELECT_EXTRA:-}"
  echo "outputs: gs://$BUCKET/$RUN (shards/, manifest.json) and gs://$BUCKET/$RUN/selection"
}
delete() { tpu delete "$TPU_NAME" --quiet; }

case "${1:-all}" in
  create) create ;; setup) setup ;; plan) plan ;; score) score ;; select) select_ ;;
  delete) delete ;; ssh) shift; on_all "$*" ;;
  all) create; setup; plan; score; select_; [[ $KEEP == 1 ]] || delete ;;
  *) echo "usage: $0 [all|create|setup|plan|score|select|delete|ssh CMD]" >&2; exit 2 ;;
esac
