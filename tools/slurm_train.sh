#!/usr/bin/env bash
# Train on a SLURM cluster: one train_net.py process per GPU, started by srun, as MMDetection's
# tools/slurm_train.sh does. Each task exports MASTER_ADDR (the allocation's first node) and
# MASTER_PORT for torch's env:// rendezvous; train_net.py reads its rank from SLURM's variables.
#
#   [GPUS=16] [GPUS_PER_NODE=8] bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG \
#       [train_net.py options] [KEY VALUE overrides]
#   GPUS=16 bash tools/slurm_train.sh gpu dcn_r50 faster_rcnn_R50_mdconv_FPN_1x.yaml \
#       OUTPUT_DIR output/dcn_r50_16gpu
#
# Environment overrides:
#   GPUS            processes (GPUs) in all (default: 8)
#   GPUS_PER_NODE   processes (GPUs) on each node (default: GPUS, at most 8); must divide GPUS
#   CPUS_PER_TASK   CPU cores per process, for its data-loading workers (default: 5)
#   SRUN_ARGS       more srun options, e.g. "--time=2-00:00:00 --qos=high"
#   PYTHON          the interpreter (default: python)
#   MASTER_PORT     the rendezvous port (default: 10000 + SLURM_JOB_ID % 20000)
#   SBATCH=1        submit the job with sbatch and return (log: JOB_NAME-<job id>.log) instead
#                   of running srun in this shell
# --num-gpus, --num-machines and --machine-rank come from SLURM: leave them out. Scale
# SOLVER.IMS_PER_BATCH and SOLVER.BASE_LR with GPUS (see the README). A run stopped by SIGTERM
# (preemption, scancel) writes a checkpoint and exits with status 143; --resume continues it.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
shift 3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$((GPUS < 8 ? GPUS : 8))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
PYTHON=${PYTHON:-python}
if [ $((GPUS % GPUS_PER_NODE)) -ne 0 ]; then
    echo "slurm_train.sh: error: GPUS=$GPUS is not a multiple of GPUS_PER_NODE=$GPUS_PER_NODE" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)

# Run by each task, inside the allocation, where the node list is known.
# shellcheck disable=SC2016  # expanded by the task's bash, not here
RENDEZVOUS='export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1);'
RENDEZVOUS+=' export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}; exec "$@"'
# shellcheck disable=SC2086  # SRUN_ARGS holds several options
SRUN=(srun --partition="$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE"
      --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
      --kill-on-bad-exit=1 $SRUN_ARGS bash -c "$RENDEZVOUS" slurm_train.sh
      "$PYTHON" -u "$REPO/train_net.py" --config-file "$CONFIG" "$@")

if [ "${SBATCH:-0}" = 1 ]; then
    # The batch script runs srun, which starts the processes on the allocated nodes.
    exec sbatch --partition="$PARTITION" --job-name="$JOB_NAME" --nodes=$((GPUS / GPUS_PER_NODE)) \
        --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" \
        --cpus-per-task="$CPUS_PER_TASK" --output="$JOB_NAME-%j.log" \
        --wrap="$(printf '%q ' "${SRUN[@]}")"
fi
exec "${SRUN[@]}"
