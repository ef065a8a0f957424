#!/bin/bash
# Submit the shard array and, to run once every task has succeeded, the reduction:
#
#   MODEL=meta-llama/Llama-3.1-8B TOKENS=100000000 examples/slurm/submit_array.sh [extra sbatch options]
#
# Settings (MODEL, STATS_DIR, TOKENS, ...) travel to both jobs in the environment (sbatch's default
# --export=ALL). Extra arguments go to both sbatch calls (e.g. --partition=gpu --account=abc).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p logs  # Slurm does not create the folder of --output
array_job=$(sbatch --parsable "$@" "$here/array_shards.sbatch")
array_job=${array_job%%;*}  # --parsable prints "jobid[;cluster]"
reduce_job=$(sbatch --parsable --dependency="afterok:$array_job" "$@" "$here/reduce.sbatch")
reduce_job=${reduce_job%%;*}
echo "array job $array_job (shards), reduce job $reduce_job (after all shards succeed)"
