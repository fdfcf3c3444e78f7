#!/usr/bin/env bash
# Score (and select) on a Cloud TPU VM slice: every step runs on all workers (--worker=all),
# each process reads only its devices' weight slices, and all write into one store on GCS.
#
#   export TPU_NAME=selectit ZONE=us-east5-a ACCELERATOR=v5p-64 \
#          RUNTIME=v2-alpha-tpuv5 BUCKET=my-bucket \
#          MODEL=models/Llama-2-70b-hf DATA=data/alpaca_data.json RUN=runs/llama2-70b \
#          CONFIG=configs/llama2_70b.py:v5p-64
#   bash launch/tpu_pod.sh all            # create, setup, verify, plan, score, select, delete
#   bash launch/tpu_pod.sh setup verify   # or steps in order: create setup verify plan score
#                                         # select delete recreate; `ssh CMD` runs CMD on all
#
# MODEL, DATA and RUN are paths inside gs://$BUCKET, which gcsfuse mounts at /mnt/gcs on every
# worker: a shared, resumable score store (stored rows are skipped) and weights read by byte
# range, not copied. Runtimes: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p
# v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
#
# setup installs one pinned stack on every worker (launch/venv.sh: Python and the exact
# versions of launch/constraints.txt, the same as CPU CI); verify checks it on every worker,
# with the processes, devices and mesh, before anything is scored.
#
# Each remote step runs detached on its workers (nohup setsid), so it outlives this ssh
# session: the script only polls for the step's status file, reconnecting when ssh drops
# (rerunning a step starts it anew; it does not attach to a running one). Every worker copies
# its step log to gs://$BUCKET/$RUN/logs/<step>-<host>.log.
# A step that fails on any worker is stopped on the others, the workers that failed are named
# with their exit codes, and `all` ends before select and delete (slice and logs kept).
#
# Preemption: when a step finds the slice PREEMPTED (gcloud's state), the slice is deleted
# and created anew, set up and verified again, and the step reruns; `score` resumes from the
# store (rows are keyed by content, so the result equals an uninterrupted run). At most
# MAX_PREEMPTIONS times per step.
set -euo pipefail

: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:?}" "${BUCKET:?}" "${CONFIG:?}" "${MODEL:?}" "${RUN:?}"
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
DATA=${DATA:-}                      # '' = the ShareGPT file the package ships
SPOT=${SPOT:-0}                     # 1 = spot/preemptible capacity
KEEP=${KEEP:-0}                     # 1 = `all` does not delete the slice at the end
EXTRA=${EXTRA:-}                    # more flags for verify, plan and score, e.g.
                                    # --config.prompts.k=5
POLL=${POLL:-30}                    # seconds between a waiting worker's status checks
SSH_RETRIES=${SSH_RETRIES:-20}      # reconnections while waiting on a step
MAX_PREEMPTIONS=${MAX_PREEMPTIONS:-5}  # recreations per step before giving up
GCS=${GCS_MOUNT:-/mnt/gcs}          # where workers mount the bucket (tests use a local dir)
# jax.distributed: a worker that hangs stops the others after HEARTBEAT_TIMEOUT s (JAX's
# default: 100); selectit_jax/parallel/distributed.py reads these variables.
TIMEOUTS="JAX_INITIALIZATION_TIMEOUT=${INIT_TIMEOUT:-300} JAX_HEARTBEAT_TIMEOUT_SECONDS=${HEARTBEAT_TIMEOUT:-60}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF=$REPO/launch/$(basename "$0")
PREEMPTED_RC=75                     # a step's exit status when the slice was preempted

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on() { tpu ssh "$TPU_NAME" --worker="$1" --command="$2"; }  # $1: all or a worker index

workers() {  # how many workers must report a status for --worker=all
  tpu describe "$TPU_NAME" --format='value(networkEndpoints.len())'
}
state() {  # READY, CREATING, PREEMPTED, ... or NOT_FOUND
  tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}
exit_if_preempted() {  # $1: the step; ends it with PREEMPTED_RC (see resilient)
  if [[ $(state) == PREEMPTED ]]; then
    echo "[$1] $TPU_NAME was PREEMPTED" >&2
    exit "$PREEMPTED_RC"
  fi
}

# run_step NAME WORKER CMD: runs CMD (bash, `set -euo pipefail`) detached on WORKER (all or
# an index) and polls until every worker has written its status. The first failure stops
# the step on the other workers too (they would wait on it in a collective forever), like
# launch/local.sh; the step fails unless every worker reports 0.
run_step() {
  local name=$1 worker=$2 cmd=$3 dir='~/selectit_steps' expect=1
  if [[ $worker == all ]]; then expect=$(workers); fi
  # CMD and its wrapper as files: no quoting of CMD through gcloud, ssh and the remote shell.
  # The wrapper is not -e: the status and the log copy must happen whatever CMD does. CMD
  # gets its own process group (setsid), whose id is the pid file, so it can be stopped.
  local body wrapper
  body=$(printf 'set -euo pipefail\n%s\n' "$cmd")
  wrapper=$(cat <<EOF
set -uo pipefail
setsid bash $dir/$name.cmd > $dir/$name.log 2>&1 < /dev/null &
echo \$! > $dir/$name.pid
wait \$!
rc=\$?
gcloud storage cp $dir/$name.log "gs://$BUCKET/$RUN/logs/$name-\$(hostname).log" \
  >> $dir/$name.log 2>&1 || echo "copying the log to gs://$BUCKET/$RUN/logs failed" >> $dir/$name.log
echo \$rc > $dir/$name.rc
EOF
)
  echo "[$name] starting on worker(s) $worker; logs: gs://$BUCKET/$RUN/logs/$name-<host>.log"
  on "$worker" "set -euo pipefail; mkdir -p $dir; rm -f $dir/$name.rc $dir/$name.pid
    echo $(printf %s "$body" | base64 | tr -d '\n') | base64 -d > $dir/$name.cmd
    echo $(printf %s "$wrapper" | base64 | tr -d '\n') | base64 -d > $dir/$name.sh
    nohup setsid bash $dir/$name.sh > /dev/null 2>&1 < /dev/null &" || {
    exit_if_preempted "$name"
    return 1
  }
  # Each poll is a short ssh that exits 0 when it could look; a nonzero exit is ssh itself:
  # try again, the step keeps running.
  local out tries=0 reported=0 failed='' status
  out=$(mktemp)
  status="set -euo pipefail; if [[ -f $dir/$name.rc ]]; then
    echo STEP_RC=\$(cat $dir/$name.rc) \$(hostname); else echo STEP_RUNNING \$(hostname); fi"
  while true; do
    sleep "$POLL"
    if ! on "$worker" "$status" > "$out"; then
      exit_if_preempted "$name"
      tries=$((tries + 1))
      if ((tries > SSH_RETRIES)); then echo "[$name] ssh failed $tries times" >&2; break; fi
      echo "[$name] ssh failed; trying again ($tries/$SSH_RETRIES)" >&2
      continue
    fi
    reported=$(grep -c '^STEP_RC=' "$out" || true)
    failed=$(grep '^STEP_RC=' "$out" | grep -v '^STEP_RC=0 ' || true)
    if [[ -n $failed || $reported -ge $expect ]]; then break; fi
  done
  if [[ -n $failed ]]; then exit_if_preempted "$name"; fi  # its processes died with the slice
  if [[ -n $failed ]]; then  # stop the step where it still runs, then let its logs land
    on "$worker" "set -euo pipefail; if [[ ! -f $dir/$name.rc && -f $dir/$name.pid ]]; then
        kill -TERM -- -\$(cat $dir/$name.pid) || true; fi" || true
    for _ in $(seq 10); do
      sleep "$POLL"
      if on "$worker" "$status" > "$out" && (($(grep -c '^STEP_RC=' "$out") >= expect)); then
        break
      fi
    done
  fi
  rm -f "$out"
  on "$worker" "set -euo pipefail; tail -n 20 $dir/$name.log | sed \"s/^/[\$(hostname)] /\"" || true
  if [[ -n $failed ]]; then  # STEP_RC=<rc> <host> lines: the first workers to fail
    failed=$(sed -E 's/^STEP_RC=([0-9]+) (.*)$/\2 exited with \1/' <<< "$failed" | paste -sd, -)
    echo "[$name] FAILED: $failed ($reported of $expect workers had finished;" \
      "the others were stopped)" >&2
  elif ((reported < expect)); then
    echo "[$name] FAILED: no status from $((expect - reported)) of $expect workers (ssh)" >&2
  fi
  if [[ -n $failed || $reported -lt $expect ]]; then
    echo "[$name] logs: gs://$BUCKET/$RUN/logs/ and $dir/$name.log on each worker" >&2
    return 1
  fi
  echo "[$name] done on $reported worker(s)"
}

create() {  # reuse a READY slice; a preempted or stopped one is deleted and made anew
  local st
  st=$(state)
  case $st in
    READY) echo "reusing $TPU_NAME"; return ;;
    NOT_FOUND) ;;
    PREEMPTED | TERMINATED | STOPPED)
      echo "$TPU_NAME is $st: deleting it to create it anew"
      tpu delete "$TPU_NAME" --quiet ;;
    *) echo "error: $TPU_NAME is $st; wait until it is READY, or delete it" >&2; return 1 ;;
  esac
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
      $([[ $SPOT == 1 ]] && echo --spot)
}

setup() {  # the committed code on every worker, the pinned stack in ~/venv, gcsfuse mounted
  local tar
  tar=$(mktemp -d)/selectit_jax.tar.gz
  git -C "$REPO" archive --format=tar.gz -o "$tar" HEAD
  tpu scp "$tar" "$TPU_NAME":~/ --worker=all || { exit_if_preempted setup; return 1; }
  rm -rf "$(dirname "$tar")"
  run_step setup all "rm -rf ~/selectit_jax && mkdir -p ~/selectit_jax
    tar xzf ~/selectit_jax.tar.gz -C ~/selectit_jax
    if ! command -v gcsfuse >/dev/null; then
      export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
      echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
      sudo apt-get update -q && sudo apt-get install -yq gcsfuse
    fi
    sudo mkdir -p $GCS && sudo chown \$USER $GCS
    mountpoint -q $GCS || gcsfuse --implicit-dirs $BUCKET $GCS
    bash ~/selectit_jax/launch/venv.sh tpu ~/venv"
}

verify() {  # the stack, the processes, devices and mesh, on every worker, before scoring
  local n
  n=$(workers)
  run_step verify all "cd ~/selectit_jax && $TIMEOUTS ~/venv/bin/python -m selectit_jax.verify \
    --config=$CONFIG --config.distributed.initialize=always --processes=$n $EXTRA"
}

recreate() {  # after a preemption: a new slice, set up and verified
  if [[ $(state) != NOT_FOUND ]]; then tpu delete "$TPU_NAME" --quiet; fi
  create
  setup
  verify
}

# plan and select run on worker 0 alone: JAX_PLATFORMS=cpu (the commands also pin CPU) so
# they never open the TPU, which on one host of a multi-host slice waits for all the others.
plan() { run_step plan 0 "cd ~/selectit_jax && JAX_PLATFORMS=cpu ~/venv/bin/python \
    -m selectit_jax.plan --config=$CONFIG --config.model.path=$GCS/$MODEL $EXTRA"; }
score() {  # the same command on every worker (jax.distributed joins them)
  run_step score all "cd ~/selectit_jax && $TIMEOUTS ~/venv/bin/python -m selectit_jax.score \
    --config=$CONFIG --config.model.path=$GCS/$MODEL ${DATA:+--config.data.path=$GCS/$DATA} \
    --config.output_dir=$GCS/$RUN --config.distributed.initialize=always $EXTRA"
}
select_() {  # no model: one worker reads every process's shards from the shared store
  run_step select 0 "cd ~/selectit_jax && JAX_PLATFORMS=cpu ~/venv/bin/python -m \
    selectit_jax.select --config=configs/select.py --config.scores_dir=$GCS/$RUN \
    --config.output_dir=$GCS/$RUN/selection ${SELECT_EXTRA:-}"
  echo "outputs: gs://$BUCKET/$RUN (shards/, manifest.json) and gs://$BUCKET/$RUN/selection"
}
delete() { tpu delete "$TPU_NAME" --quiet; }

# resilient STEP: runs STEP in a fresh shell (`set -e` is off inside a function whose status
# is tested, so each attempt is its own `bash tpu_pod.sh once STEP`). When the attempt finds
# the slice preempted, recreates it (delete, create, setup, verify) and runs STEP again.
resilient() {
  local step=$1 next=$1 rc preemptions=0
  while true; do
    rc=0
    bash "$SELF" once "$next" || rc=$?
    if ((rc == PREEMPTED_RC)); then
      preemptions=$((preemptions + 1))
      if ((preemptions > MAX_PREEMPTIONS)); then
        echo "[$step] preempted $preemptions times; giving up (MAX_PREEMPTIONS)" >&2
        return 1
      fi
      echo "[$step] preempted ($preemptions of at most $MAX_PREEMPTIONS):" \
        "recreating $TPU_NAME, then $step again (the store keeps every row written)"
      next=recreate
    elif ((rc != 0)); then
      return "$rc"
    elif [[ $next == recreate && ! $step =~ ^(setup|verify|recreate)$ ]]; then
      next=$step  # the slice is back, set up and verified
    else
      return 0
    fi
  done
}

# Each step on its own line: with `set -e`, the first failing step ends the script, so a
# failed score never reaches select or delete.
all() {
  create
  resilient setup
  resilient verify
  resilient plan
  resilient score
  resilient select
  if [[ $KEEP != 1 ]]; then delete; fi
}

if [[ ${1:-} == once ]]; then  # one attempt of a remote step (see resilient)
  case $2 in
    setup) setup ;; verify) verify ;; plan) plan ;; score) score ;; select) select_ ;;
    recreate) recreate ;;
  esac
  exit
fi
if [[ ${1:-} == ssh ]]; then shift; on all "set -euo pipefail; $*"; exit; fi
steps=("${@:-all}")
for step in "${steps[@]}"; do  # all names checked before any step runs
  if [[ ! $step =~ ^(all|create|setup|verify|plan|score|select|delete|recreate)$ ]]; then
    echo "usage: $0 [all | STEP... | ssh CMD]; steps: create setup verify plan score" \
      "select delete recreate" >&2
    exit 2
  fi
done
for step in "${steps[@]}"; do
  case $step in
    create) create ;; delete) delete ;; all) all ;;
    *) resilient "$step" ;;
  esac
done
