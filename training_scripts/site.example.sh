# Site settings for training_scripts/: THE one file to edit for a cluster.
#   cp training_scripts/site.example.sh training_scripts/site.sh   (site.sh is yours; keep it out of git)
# Sourced by submit.sh (before sbatch) and by every *.sbatch (inside the job). Plain bash.

# Scheduler options added to every sbatch call (partition, account, QOS, ...).
SITE_SBATCH_ARGS=(--partition=gpu --account=my-project)
# Per-job-kind resources: one srun task per GPU.
PRETRAIN_SBATCH_ARGS=(--nodes=1 --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=8 --time=24:00:00)
FINETUNE_SBATCH_ARGS=(--nodes=1 --gpus-per-node=1 --ntasks-per-node=1 --cpus-per-task=8 --time=08:00:00)
EVALUATE_SBATCH_ARGS=(--nodes=1 --gpus-per-node=1 --ntasks-per-node=1 --cpus-per-task=8 --time=04:00:00)

# The working directory of every run. All config paths are relative to it:
#   data/pretrain  data/val/<set>  data/sft/<task>.json  checkpoints/  out/
# Default: the repository checkout, with data/, checkpoints/ and out/ as links to scratch storage, e.g.
#   ln -s /scratch/$USER/midtrain/data data; ln -s /scratch/$USER/midtrain/out out
MIDTRAIN_ROOT="${MIDTRAIN_REPO}"

# Where jobs keep their logs: one directory per job, <kind>-<job id>/ (task logs, the frozen config list,
# the sbatch command). Must be visible from every node (preempted tasks leave a marker file here).
MIDTRAIN_LOG_DIR="${MIDTRAIN_ROOT}/logs/slurm"

# Environment activation: runs inside EVERY srun task, right before midtrain (so sites that submit with
# --export=NONE work too): a venv, conda, modules, NCCL variables, ...
site_activate() {
    # module load cuda/12.4
    # shellcheck disable=SC1091
    source "${MIDTRAIN_REPO}/.venv/bin/activate"
}

# Preemption lead time: the sbatch scripts ask for --signal=USR1@120 (before the time limit). On a
# partition with PreemptMode=REQUEUE/CANCEL, a preempted job gets SIGTERM and, GraceTime seconds later,
# SIGKILL: ask your admins for a GraceTime above one checkpoint save (midtrain prints it at the first
# save; a 1B model with Adam state on a parallel filesystem can take minutes). midtrain checkpoints and
# exits 75 on either signal.
