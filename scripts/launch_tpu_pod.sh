#!/usr/bin/env bash
# Launch `longctx train` on every worker of a Cloud TPU VM slice (e.g. a v5p-128: 16 workers x 4 chips).
#
#   scripts/launch_tpu_pod.sh [options] TPU_NAME ZONE PROJECT RECIPE RUN_DIR [--set key=value ...]
#
# 1. setup: copies this checkout (tracked and untracked-but-not-ignored files, e.g. a tokenizer you
#    trained into tokenizers/) over ~/longctx on every worker and installs it into ~/longctx/.venv
#    (made once, then reused) with jax[tpu];
# 2. run: `longctx train RECIPE --run-dir RUN_DIR --distributed --no-progress [--set ...]` on all workers
#    at once (`gcloud compute tpus tpu-vm ssh --worker=all`); jax.distributed finds the other workers
#    by itself on a TPU slice.
# RUN_DIR must be one directory every worker sees. `longctx train` writes it through the local
# filesystem, so RUN_DIR=gs://BUCKET/PATH is mounted: each worker mounts BUCKET with gcsfuse (which must
# be installed there) at /tmp/longctx-gcs/BUCKET and trains with --run-dir /tmp/longctx-gcs/BUCKET/PATH.
# Any other RUN_DIR (an NFS path, say) is passed as it is.
#
# Options:
#   --dry-run    print the gcloud commands instead of running them
#   --no-setup   skip step 1 (the workers already have this checkout and its venv)
#   --detach     start training under nohup (log: ~/longctx/train.log on each worker) and return
#   -h, --help   this text
#
# Example:
#   scripts/launch_tpu_pod.sh my-v5p-128 us-east5-a my-project recipes/pod/transformer.py \
#       gs://my-bucket/pod/transformer --set train.steps=1000
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
SETUP=1
DETACH=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-setup) SETUP=0; shift ;;
    --detach) DETACH=1; shift ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 5 ]]; then
  echo "error: need TPU_NAME ZONE PROJECT RECIPE RUN_DIR (see --help)" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 PROJECT=$3 RECIPE=$4 RUN_DIR=$5
shift 5
EXTRA=("$@")  # --set key=value ... passed on to longctx train

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARGS=""  # a recipe taking arguments: recipes/finetune.py:model=rmt,dataset=arxiv
if [[ "$RECIPE" == *.py:* ]]; then
  ARGS=":${RECIPE#*.py:}"
  RECIPE="${RECIPE%%.py:*}.py"
fi
if [[ -f "$RECIPE" ]]; then  # workers see the repo under ~/longctx: use the recipe's path inside it
  ABS="$(cd "$(dirname "$RECIPE")" && pwd)/$(basename "$RECIPE")"
  if [[ "$ABS" != "$REPO"/* ]]; then
    echo "error: recipe $RECIPE is outside $REPO; only the repo is copied to the workers" >&2
    exit 2
  fi
  RECIPE=${ABS#"$REPO"/}
elif [[ ! -f "$REPO/$RECIPE" ]]; then
  echo "error: recipe $RECIPE not found (give a path inside the repo, e.g. recipes/pod/transformer.py)" >&2
  exit 2
fi
RECIPE="$RECIPE$ARGS"
MOUNT_CMD=""
if [[ "$RUN_DIR" == gs://* ]]; then  # mount the bucket on every worker; train in the mounted path
  BUCKET=${RUN_DIR#gs://}
  BUCKET=${BUCKET%%/*}
  MOUNT=/tmp/longctx-gcs/$BUCKET
  MOUNT_CMD="{ command -v gcsfuse > /dev/null || { echo \"gcsfuse is not installed on \$(hostname)\" >&2; exit 2; }; }"
  MOUNT_CMD+=" && mkdir -p $MOUNT && { mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT; } && "
  RUN_DIR=$MOUNT${RUN_DIR#gs://"$BUCKET"}
else
  echo "note: RUN_DIR $RUN_DIR must be one directory that every worker sees (or use gs://BUCKET/PATH)" >&2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT" --worker=all)

run() {  # print (dry run) or run one command
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ $SETUP == 1 ]]; then
  TARBALL=${TMPDIR:-/tmp}/longctx-$$.tar.gz
  if [[ $DRY_RUN == 1 ]]; then
    echo "# pack tracked and untracked-but-not-ignored files of $REPO into $TARBALL"
  else
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
      tar --null -T - -czf "$TARBALL")
    trap 'rm -f "$TARBALL"' EXIT
  fi
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:~/longctx.tar.gz" "${WHERE[@]}"
  SETUP_CMD='set -e; mkdir -p ~/longctx && tar -xzf ~/longctx.tar.gz -C ~/longctx && cd ~/longctx'
  SETUP_CMD+=' && { test -x .venv/bin/python || python3 -m venv .venv; } && .venv/bin/pip install -q -U pip'
  SETUP_CMD+=' && .venv/bin/pip install -q -e . "jax[tpu]"'
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command="$SETUP_CMD"
fi

TRAIN=(.venv/bin/longctx train "$RECIPE" --run-dir "$RUN_DIR" --distributed --no-progress ${EXTRA[@]+"${EXTRA[@]}"})
TRAIN_CMD="cd ~/longctx && $MOUNT_CMD$(printf '%q ' "${TRAIN[@]}")"
if [[ $DETACH == 1 ]]; then
  TRAIN_CMD="cd ~/longctx && ${MOUNT_CMD}nohup $(printf '%q ' "${TRAIN[@]}")> train.log 2>&1 < /dev/null &"
fi
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command="$TRAIN_CMD"
