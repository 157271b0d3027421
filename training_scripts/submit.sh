#!/usr/bin/env bash
# Submit a training_scripts/*.sbatch job with the site's settings, as an array of one task per config.
#
#   training_scripts/submit.sh KIND [--dry-run] [--sbatch=OPTION...] CONFIG|DIR|'GLOB'|LIST... [-- OVERRIDES...]
#   KIND: pretrain | finetune | evaluate | report | prepare (an array over input parts: PART|'GLOB'|@LIST... -- prepare options)
#   --sbatch=OPTION: one more sbatch option, after the site's (e.g. --sbatch=--dependency=afterok:123);
#   `midtrain experiment submit` passes the job name and dependencies this way.
#
# Sources training_scripts/site.sh (SITE_SBATCH_ARGS, <KIND>_SBATCH_ARGS, MIDTRAIN_LOG_DIR), expands
# the configs ONCE, here, and writes them to the job's log directory
#   MIDTRAIN_LOG_DIR/KIND-<UTC time>-<pid>/configs.txt   (plus submit.txt: the sbatch command, job_id)
#   MIDTRAIN_LOG_DIR/KIND-<job id> -> that directory    (a link, made once the job ID is known)
# so task i runs line i even when a glob would match other files by the time the task starts or is
# requeued. Then runs `sbatch --array=0-(N-1) --output=<log dir>/%A_%a.out ... KIND.sbatch`.
# evaluate with lm-eval tasks (--tasks, or a tasks: key): one array task per checkpoint of the config (listed
# once, here, by `midtrain evaluate --list_checkpoints` in the site's environment), each writing a part CSV;
# then a merge job (evaluate.sbatch --merge, --dependency=afterany:<array>) adds their rows to the CSV once
# (its ID in <log dir>/merge_job_id; its log merge-<job>_<task>.out).
# --dry-run prints the sbatch command and every task's command as the job will run it (devices and
# nodes from the sbatch request, not from this shell) without submitting or writing anything.
set -euo pipefail

MIDTRAIN_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=training_scripts/lib.sh
source "$MIDTRAIN_REPO/training_scripts/lib.sh"
usage() { sed -n '2,/^set -euo/p' "$MIDTRAIN_REPO/training_scripts/submit.sh" | grep '^#' | sed 's/^# \{0,1\}//'; }

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { usage; exit 0; }
kind="$1"; shift
case "$kind" in pretrain|finetune|evaluate|report|prepare) ;; *) die "unknown job kind $kind (pretrain, finetune, evaluate, report, prepare)" ;; esac
expand=expand_configs
[[ "$kind" != prepare ]] || expand=expand_parts
[[ "$kind" != evaluate ]] || expand=expand_eval_items
extra_sbatch=() rest=() after_dashes=0
for arg in "$@"; do
    if (( ! after_dashes )) && [[ "$arg" == --sbatch=* ]]; then extra_sbatch+=("${arg#--sbatch=}"); else rest+=("$arg"); fi
    [[ "$arg" != -- ]] || after_dashes=1
done
parse_args "${rest[@]+"${rest[@]}"}"
load_site
configs=()
expanded="$("$expand" "${CONFIG_ARGS[@]}")" || exit 2
while IFS= read -r line; do configs+=("$line"); done <<< "$expanded"
n=${#configs[@]}
merges=()  # evaluate: the configs run per checkpoint, whose part CSVs a merge job adds to their CSV
if [[ "$kind" == evaluate ]]; then
    while IFS= read -r line; do [[ -z "$line" ]] || merges+=("$line"); done \
        < <(printf '%s\n' "${configs[@]}" | grep $'\t' | cut -f1 | awk '!seen[$0]++')
fi
opts=()
while IFS= read -r line; do opts+=("$line"); done < <(requested_options "$kind")

# The preemption signal must reach midtrain: only SIGUSR1 is handled; B: (batch shell only) is forwarded.
signal="$(sbatch_option signal "${opts[@]+"${opts[@]}"}")"
case "$kind:$signal" in
    prepare:*) ;;  # not preempted with a checkpoint: a requeued task skips the parts already prepared
    *:) note "warning: no --signal for $kind jobs: a run reaching its time limit is killed without a checkpoint" ;;
    *:B:*) note "note: --signal=$signal reaches only the batch shell; the script forwards it to the job step" ;;
esac
sig_name="${signal#*:}"; sig_name="${sig_name%@*}"; sig_name="${sig_name#SIG}"
[[ -z "$signal" || "$sig_name" == "$PREEMPT_SIGNAL" || "$sig_name" == "$(kill -l "$PREEMPT_SIGNAL")" ]] \
    || die "--signal=$signal: the scripts and midtrain handle SIG$PREEMPT_SIGNAL; use --signal=${signal%%:*}:$PREEMPT_SIGNAL@SECONDS or --signal=$PREEMPT_SIGNAL@SECONDS"

# A time limit hardly longer than the signal's lead: every attempt is signalled soon after it starts.
limit="$(time_seconds "$(sbatch_option "time|t" "${opts[@]+"${opts[@]}"}")")"
lead=60  # sbatch's default lead when --signal has no @
[[ "$signal" == *@* ]] && lead="${signal##*@}"
if [[ -n "$signal" && -n "$limit" && "$lead" =~ ^[0-9]+$ ]] && (( limit <= 2 * lead )); then
    note "warning: --time gives $limit s and --signal=$signal comes $lead s before the end: every attempt is" \
         "checkpointed and requeued about $(( limit - lead )) s after it starts; raise --time or lower the @ lead"
fi

kind_args_name="$(echo "$kind" | tr '[:lower:]' '[:upper:]')_SBATCH_ARGS[@]"
script_args=(--repo="$MIDTRAIN_REPO" --site="$MIDTRAIN_SITE")
if [[ "$DRY_RUN" == 1 ]]; then
    job_dir="$MIDTRAIN_LOG_DIR/$kind-<time>"
    list="${CONFIG_ARGS[*]}"
else
    job_dir="$MIDTRAIN_LOG_DIR/$kind-$(date -u +%Y%m%d-%H%M%S)-$$"
    list="$job_dir/configs.txt"
fi
[[ ( "$kind" != prepare && "$kind" != evaluate ) || "$DRY_RUN" == 1 ]] || list="@$list"
cmd=(sbatch "${SITE_SBATCH_ARGS[@]+"${SITE_SBATCH_ARGS[@]}"}" "${!kind_args_name+"${!kind_args_name}"}"
     "${extra_sbatch[@]+"${extra_sbatch[@]}"}" --array="0-$((n - 1))" --output="$job_dir/%A_%a.out"
     "$MIDTRAIN_REPO/training_scripts/$kind.sbatch" "${script_args[@]}" "$list" -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}")
merge_cmd=()
if (( ${#merges[@]} )); then
    merge_list="$job_dir/merge.txt"
    [[ "$DRY_RUN" != 1 ]] || merge_list="${merges[*]}"
    merge_cmd=(sbatch "${SITE_SBATCH_ARGS[@]+"${SITE_SBATCH_ARGS[@]}"}" "${!kind_args_name+"${!kind_args_name}"}"
               "${extra_sbatch[@]+"${extra_sbatch[@]}"}" --dependency=afterany:JOB --array="0-$((${#merges[@]} - 1))"
               --output="$job_dir/merge-%A_%a.out" "$MIDTRAIN_REPO/training_scripts/evaluate.sbatch"
               "${script_args[0]}" --merge "${script_args[@]:1}" "@$merge_list" -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}")
fi
if [[ "$DRY_RUN" == 1 ]]; then
    echo "${cmd[*]}"
    (( ${#merge_cmd[@]} == 0 )) || echo "${merge_cmd[*]/afterany:JOB/afterany:<job id>}"
    # what each task will run: no SLURM_* of this shell (an interactive allocation) may leak into it
    env $(compgen -e | grep '^SLURM_' | sed 's/^/-u /') DRY_RUN=1 \
        bash "$MIDTRAIN_REPO/training_scripts/$kind.sbatch" "${script_args[@]}" "${CONFIG_ARGS[@]}" -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
    exit 0
fi

mkdir -p "$job_dir"
printf '%s\n' "${configs[@]}" > "${list#@}"
printf '%q ' "${cmd[@]}" > "$job_dir/submit.txt"; echo >> "$job_dir/submit.txt"
out="$(sbatch --parsable "${cmd[@]:1}")" || die "sbatch failed (the configs are in ${list#@})"
job_id="${out%%;*}"
echo "$job_id" > "$job_dir/job_id"
ln -sfn "$(basename "$job_dir")" "$MIDTRAIN_LOG_DIR/$kind-$job_id"
echo "Submitted $kind job $job_id: $n task(s); configs and logs in $MIDTRAIN_LOG_DIR/$kind-$job_id/"
if (( ${#merge_cmd[@]} )); then
    printf '%s\n' "${merges[@]}" > "$merge_list"
    merge_cmd=("${merge_cmd[@]/afterany:JOB/afterany:$job_id}")
    printf '%q ' "${merge_cmd[@]}" >> "$job_dir/submit.txt"; echo >> "$job_dir/submit.txt"
    out="$(sbatch --parsable "${merge_cmd[@]:1}")" || die "sbatch of the merge job failed; merge later with: midtrain evaluate --config CONFIG --merge true"
    echo "${out%%;*}" > "$job_dir/merge_job_id"
    echo "Submitted evaluate merge job ${out%%;*} (after $job_id): adds the part CSVs of ${#merges[@]} config(s) to their CSV"
fi
