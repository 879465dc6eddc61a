#!/usr/bin/env bash
#SBATCH --job-name=longctx
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=longctx-%j.out
# Train a longctx recipe on a SLURM GPU cluster: one process per GPU.
#
#   sbatch [--nodes=N --gpus-per-node=G --ntasks-per-node=G] scripts/launch_slurm.sh RECIPE RUN_DIR [--set ...]
#   bash scripts/launch_slurm.sh --dry-run RECIPE RUN_DIR [--set ...]   # print the commands, run nothing
#
# The #SBATCH lines above are defaults: override them on the sbatch command line. The recipe's mesh must
# have nodes x gpus-per-node devices (recipes/pod/*: 64 = 8 nodes x 8 GPUs). Inside the job:
# 1. setup (once, on the first node): $LONGCTX_VENV (default: REPO/.venv) with this repo and jax[cuda12],
#    unless it already has longctx; the repo and the venv must be on a filesystem every node sees;
# 2. run: `srun longctx train RECIPE --run-dir RUN_DIR --distributed --no-progress [--set ...]`, one task per
#    GPU. jax.distributed.initialize() reads SLURM's variables: coordinator (the first node), process count
#    and id, and it gives each process the one GPU numbered $SLURM_LOCALID among those the node shows; so
#    keep --ntasks-per-node equal to --gpus-per-node, and do not bind GPUs to tasks (--gpus-per-task or
#    --gpu-bind would leave each task one GPU, numbered 0). RUN_DIR must be shared by all nodes (NFS, Lustre,
#    a bucket mounted with gcsfuse).
#
# Options (before RECIPE):
#   --dry-run    print the setup and srun commands instead of running them (works outside SLURM too)
#   --no-setup   use $LONGCTX_VENV as it is
#   -h, --help   this text
set -euo pipefail

usage() { sed -n '/^# Train a longctx/,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
SETUP=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-setup) SETUP=0; shift ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "error: need RECIPE RUN_DIR (see --help)" >&2
  exit 2
fi
RECIPE=$1 RUN_DIR=$2
shift 2
EXTRA=("$@")  # --set key=value ... passed on to longctx train

# Under sbatch the script runs from a copy in SLURM's spool directory: find the repo from the submit dir.
if [[ -n "${SLURM_SUBMIT_DIR:-}" && ! -f "$(dirname "${BASH_SOURCE[0]}")/../pyproject.toml" ]]; then
  REPO=$(cd "$SLURM_SUBMIT_DIR" && git rev-parse --show-toplevel 2>/dev/null || pwd)
else
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
VENV=${LONGCTX_VENV:-$REPO/.venv}
RECIPE_FILE="$RECIPE"  # a recipe taking arguments: recipes/finetune.py:model=rmt,dataset=arxiv
[[ "$RECIPE" == *.py:* ]] && RECIPE_FILE="${RECIPE%%.py:*}.py"
if [[ ! -f "$RECIPE_FILE" && ! -f "$REPO/$RECIPE_FILE" ]]; then
  echo "error: recipe $RECIPE_FILE not found (give a path such as recipes/pod/transformer.py)" >&2
  exit 2
fi
if [[ $DRY_RUN == 0 && -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: not inside a SLURM job; submit it: sbatch scripts/launch_slurm.sh $RECIPE $RUN_DIR ..." >&2
  exit 2
fi

run() {  # print (dry run) or run one command
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ $SETUP == 1 ]] && { [[ $DRY_RUN == 1 ]] || ! "$VENV/bin/python" -c "import longctx" 2>/dev/null; }; then
  run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install -q -U pip
  run "$VENV/bin/pip" install -q -e "$REPO" "jax[cuda12]"
fi

cd "$REPO"
run srun --kill-on-bad-exit=1 "$VENV/bin/longctx" train "$RECIPE" --run-dir "$RUN_DIR" --distributed --no-progress \
    ${EXTRA[@]+"${EXTRA[@]}"}
