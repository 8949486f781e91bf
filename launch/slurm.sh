#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, each told its machine rank and rank 0's address.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh accelerate_configs/multi_node.yaml recipes/adalomo.py \
#       --model_name_or_path <model> --dataset_name <data> --output_dir runs/adalomo-2x8 --save_steps 200 \
#       --resume_from_checkpoint auto
#
# The config file's distributed_type/DeepSpeed/FSDP settings apply (any file in accelerate_configs/); machine count,
# process count, rank and address come from SLURM. --output_dir must be on a filesystem every node sees: each
# process writes its part of every checkpoint there. Preemption: SLURM's SIGTERM (or SIGUSR1, with
# --signal=USR1@120) makes the run checkpoint and exit 0. Put --resume_from_checkpoint auto in the command and the
# same command serves the first run (starts fresh) and every requeue or resubmission (resumes from the newest
# checkpoint).
#SBATCH --job-name=optimizer-recipes
#SBATCH --ntasks-per-node=1
#SBATCH --signal=USR1@120
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: sbatch [--nodes=N --gpus-per-node=G] launch/slurm.sh <accelerate config> <recipe.py> [recipe flags]" >&2
  exit 2
fi
config=$1
recipe=$2
shift 2
nodes=${SLURM_JOB_NUM_NODES:?"run this under sbatch or salloc (SLURM_JOB_NUM_NODES is not set)"}
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}
main_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk "NR == 1")  # awk reads all: no SIGPIPE under pipefail
port=${MAIN_PROCESS_PORT:-29500}

# $SLURM_NODEID is expanded on each node by the srun task, not here.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$0" --num_machines "$1" --num_processes "$2" \
  --machine_rank "$SLURM_NODEID" --main_process_ip "$3" --main_process_port "$4" --rdzv_backend static "${@:5}"' \
  "$config" "$nodes" "$((nodes * gpus_per_node))" "$main_ip" "$port" "$recipe" "$@"
