#!/usr/bin/env bash
# One task of a job step: srun starts one per task (one per GPU); the *.sbatch scripts build the call.
#
#   task.sh --repo=DIR --site=FILE --marker=FILE -- COMMAND...
#
# * Sets the environment up inside the task: sources the site file and runs its site_activate, then
#   cds to MIDTRAIN_ROOT. On sites that submit with --export=NONE, srun tasks see none of the batch
#   shell's environment (no venv on the PATH), so this cannot happen in the batch shell alone.
# * Turns a preempted task into a clean end of the step: when COMMAND exits 75 (checkpoint written), or
#   dies of SIGUSR1 before midtrain installed its handler (a signal during start-up: nothing to save),
#   it creates FILE and exits 0. srun --kill-on-bad-exit therefore never kills a sibling rank that is
#   still writing its part of the checkpoint, and the batch script requeues the job when FILE exists.
# * Forwards SIGUSR1 it receives to COMMAND (a batch shell forwarding a --signal=B:USR1 request).
# * Says "task N started" on stderr once a SIGUSR1 can no longer kill it.
set -euo pipefail
PREEMPT_RECEIVED=0
trap 'PREEMPT_RECEIVED=1' USR1  # first thing: a signal while this task is still setting up is not fatal
echo "midtrain-sbatch: task ${SLURM_PROCID:-0} started" >&2  # from here on SIGUSR1 is a preemption (tests wait for it)

repo="" site="" marker=""
while (( $# )); do
    case "$1" in
        --repo=*) repo="${1#--repo=}" ;;
        --site=*) site="${1#--site=}" ;;
        --marker=*) marker="${1#--marker=}" ;;
        --) shift; break ;;
        *) echo "task.sh: unknown argument $1 (usage: task.sh --repo=DIR --site=FILE --marker=FILE -- COMMAND...)" >&2; exit 2 ;;
    esac
    shift
done
[[ -n "$repo" && -n "$site" && -n "$marker" && $# -gt 0 ]] || { echo "task.sh: needs --repo, --site, --marker and a command" >&2; exit 2; }

MIDTRAIN_REPO="$repo"
MIDTRAIN_SITE="$site"
# shellcheck source=training_scripts/lib.sh
source "$repo/training_scripts/lib.sh"
load_site
set +u  # activation scripts (conda, modules) read unset variables
site_activate
set -u
cd "$MIDTRAIN_ROOT"

if (( PREEMPT_RECEIVED )); then  # signalled while setting up: nothing to save, requeue
    note "task ${SLURM_PROCID:-0}: SIG$PREEMPT_SIGNAL before the command started; not starting it"
    mkdir -p "$(dirname "$marker")"; touch "$marker"
    exit 0
fi
child=""
# shellcheck disable=SC2064
trap 'PREEMPT_RECEIVED=1; [[ -z "$child" ]] || kill "-$PREEMPT_SIGNAL" "$child" 2>/dev/null || true' "$PREEMPT_SIGNAL"
"$@" &
child=$!
wait_child "$child" && rc=0 || rc=$?
killed_by_signal=$((128 + $(kill -l "$PREEMPT_SIGNAL")))
# 255: bash lost the status when the trap interrupted its wait just as the command died of the signal
if (( rc == EXIT_PREEMPTED )) || (( PREEMPT_RECEIVED && (rc == killed_by_signal || rc == 255) )); then
    (( rc == EXIT_PREEMPTED )) \
        || note "task ${SLURM_PROCID:-0}: SIG$PREEMPT_SIGNAL arrived before midtrain installed its handler; nothing to save"
    mkdir -p "$(dirname "$marker")"; touch "$marker"
    exit 0
fi
exit "$rc"
