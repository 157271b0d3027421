# Shared helpers of training_scripts/*.sbatch, submit.sh and task.sh (sourced, not run).
#
# Every *.sbatch finds the repository before sourcing this file, by absolute path: SLURM runs a copy
# of the script from its spool directory, so submit.sh passes --repo=DIR (see locate_repo there).
#
# Environment knobs (all optional):
#   MIDTRAIN_SITE   site file to source (default training_scripts/site.sh; submit.sh passes --site=FILE)
#   MIDTRAIN_CMD    the midtrain executable (default: midtrain); tests point it at a stub
#   MIDTRAIN_SRUN   launcher prefix (default: srun --kill-on-bad-exit=1; empty = run the task in the batch shell)
#   DRY_RUN=1       print the command(s) of every array task instead of running
#   SLURM_*         set by SLURM inside a job: SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID,
#                   SLURM_NNODES, SLURM_GPUS_ON_NODE, SLURM_NTASKS_PER_NODE (never read in a dry run)

EXIT_PREEMPTED=75  # midtrain exits with this after a preemption checkpoint: requeue the task
PREEMPT_SIGNAL=USR1  # what the #SBATCH --signal lines ask for and midtrain handles (preemption_signal)

# A preemption signal from now on is remembered, not fatal (until run_task / task.sh start the command).
PREEMPT_RECEIVED="${PREEMPT_RECEIVED:-0}"
trap 'PREEMPT_RECEIVED=1' "$PREEMPT_SIGNAL"

die() { echo "midtrain-sbatch: error: $*" >&2; exit 2; }
note() { echo "midtrain-sbatch: $*" >&2; }

load_site() {
    local site="${MIDTRAIN_SITE:-$MIDTRAIN_REPO/training_scripts/site.sh}"
    [[ -f "$site" ]] || die "no site file $site; copy training_scripts/site.example.sh to training_scripts/site.sh and edit it"
    local dir
    dir="$(cd "$(dirname "$site")" && pwd)" && [[ -n "$dir" ]] || die "cannot resolve the directory of site file $site"
    MIDTRAIN_SITE="$dir/$(basename "$site")"
    # shellcheck disable=SC1090
    source "$MIDTRAIN_SITE"
    MIDTRAIN_ROOT="${MIDTRAIN_ROOT:-$MIDTRAIN_REPO}"
    MIDTRAIN_LOG_DIR="${MIDTRAIN_LOG_DIR:-$MIDTRAIN_ROOT/logs/slurm}"
    [[ "$MIDTRAIN_LOG_DIR" == /* ]] || MIDTRAIN_LOG_DIR="$MIDTRAIN_ROOT/$MIDTRAIN_LOG_DIR"
}

# read_list FILE: the paths a list file names, one per line ('#' comments and blank lines dropped; order kept).
read_list() {
    local line
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%%#*}"; line="${line#"${line%%[![:space:]]*}"}"; line="${line%"${line##*[![:space:]]}"}"
        [[ -z "$line" ]] || echo "$line"
    done < "$1"
}

# glob_matches WHAT PATTERN: the matches of a quoted glob, sorted; an error naming WHAT when none match.
glob_matches() {
    compgen -G "$2" | LC_ALL=C sort || die "no $1 matches $2"
}

# absolute_unique WHAT PATH...: each path made absolute, one per line; a missing or repeated one is an error.
absolute_unique() {
    local what="$1" f abs seen=" "; shift
    (( $# )) || die "no ${what}s given"
    for f in "$@"; do
        [[ -e "$f" ]] || die "$what $f does not exist"
        abs="$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"
        [[ "$seen" != *" $abs "* ]] || die "$what $f is listed twice"
        seen+="$abs "
        echo "$abs"
    done
}

# expand_config_files ARG...: one config per line. ARG is a .yaml file, a directory (its *.yaml, recursive,
# sorted), a glob in quotes (sorted), or a list file (one path per line, '#' comments; order kept).
# Relative paths are taken from the current directory. Duplicates are an error (two tasks, one out_dir).
expand_config_files() {
    local arg line out=()
    for arg in "$@"; do
        if [[ -d "$arg" ]]; then
            while IFS= read -r line; do out+=("$line"); done < <(find "$arg" -name '*.yaml' | LC_ALL=C sort)
        elif [[ -f "$arg" && "$arg" == *.y*ml ]]; then
            out+=("$arg")
        elif [[ -f "$arg" ]]; then
            while IFS= read -r line; do out+=("$line"); done < <(read_list "$arg")
        else
            local matches
            matches="$(glob_matches config "$arg")" || exit 2
            while IFS= read -r line; do out+=("$line"); done <<< "$matches"
        fi
    done
    absolute_unique config "${out[@]+"${out[@]}"}"
}

expand_configs() { expand_config_files "$@"; }  # the items of an array; a *.sbatch may redefine it

# config_field FILE KEY [OVERRIDES...]: a top-level scalar of a config; a '--KEY VALUE' override wins.
config_field() {
    local file="$1" key="$2"; shift 2
    local prev=""
    local arg value=""
    for arg in "$@"; do
        [[ "$prev" == "--$key" ]] && value="$arg"
        [[ "$arg" == "--$key="* ]] && value="${arg#*=}"
        prev="$arg"
    done
    if [[ -z "$value" ]]; then
        value="$(sed -n "s/^$key:[[:space:]]*\([^#]*\).*/\1/p" "$file" | head -n 1)"
        value="${value%"${value##*[![:space:]]}"}"; value="${value#[\"\']}"; value="${value%[\"\']}"
    fi
    echo "$value"
}

# has_checkpoint DIR: DIR (relative to MIDTRAIN_ROOT) holds a complete step-* checkpoint (COMPLETE marker).
has_checkpoint() {
    local dir="$1" d
    [[ "$dir" == /* ]] || dir="$MIDTRAIN_ROOT/$dir"
    for d in "$dir"/step-*; do [[ -f "$d/COMPLETE" ]] && return 0; done
    return 1
}

# resume_args CONFIG [OVERRIDES...]: how a (re)started task resumes, printed as arguments.
#  * the run's out_dir already has a checkpoint (a requeue or resubmission) -> --resume auto
#  * else the config names a start checkpoint (midtraining)                 -> nothing: use it
#  * else (a fresh pretraining run)                                          -> --resume auto
# `--resume auto` alone would start a midtraining run from scratch on its first attempt (out_dir is
# still empty), silently skipping the pretrained weights; hence the middle case.
resume_args() {
    local cfg="$1"; shift
    local out resume
    out="$(config_field "$cfg" out_dir "$@")"
    resume="$(config_field "$cfg" resume "$@")"
    if [[ -n "$out" ]] && has_checkpoint "$out"; then echo "--resume auto"; return; fi
    case "$resume" in
        ""|auto|false|False|null|true|True) echo "--resume auto" ;;
        *) echo "" ;;  # the config's own start checkpoint
    esac
}

# task_index N: the config index of this array task (SLURM_ARRAY_TASK_ID, default 0 for one config).
task_index() {
    local n="$1"
    if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        (( SLURM_ARRAY_TASK_ID < n )) || die "array task $SLURM_ARRAY_TASK_ID but only $n configs (use --array=0-$((n - 1)))"
        echo "$SLURM_ARRAY_TASK_ID"
    elif (( n == 1 )); then echo 0
    else die "$n configs but no SLURM_ARRAY_TASK_ID; submit with --array=0-$((n - 1)) (training_scripts/submit.sh does)"
    fi
}

# sbatch_option NAME ARG...: the last value of sbatch option NAME (long form, '--NAME=V' or '--NAME V',
# or one short letter '-X V'/'-XV' after a '|': "nodes|N") among ARG...; empty when absent.
sbatch_option() {
    local long="${1%%|*}" short="" prev="" arg value=""
    [[ "$1" == *"|"* ]] && short="${1#*|}"
    shift
    for arg in "$@"; do
        if [[ "$prev" == "--$long" || ( -n "$short" && "$prev" == "-$short" ) ]]; then value="$arg"
        elif [[ "$arg" == "--$long="* ]]; then value="${arg#*=}"
        elif [[ -n "$short" && "$arg" == "-$short"?* ]]; then value="${arg#-"$short"}"
        fi
        prev="$arg"
    done
    echo "$value"
}

# time_seconds TIME: an sbatch --time value (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds;
# nothing for values it does not know (UNLIMITED, ...).
time_seconds() {
    local t="$1" d=0 h=0 m=0 s=0 parts
    [[ "$t" =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] || return 0
    if [[ "$t" == *-* ]]; then
        d="${t%%-*}"; IFS=: read -r h m s <<< "${t#*-}"
    else
        IFS=: read -r -a parts <<< "$t"
        case ${#parts[@]} in 1) m="${parts[0]}" ;; 2) m="${parts[0]}"; s="${parts[1]}" ;; *) h="${parts[0]}"; m="${parts[1]}"; s="${parts[2]}" ;; esac
    fi
    echo $(( 10#$d * 86400 + 10#${h:-0} * 3600 + 10#${m:-0} * 60 + 10#${s:-0} ))
}

# script_sbatch_lines KIND: the options of the '#SBATCH' lines of KIND.sbatch, one word per line.
script_sbatch_lines() {
    sed -n 's/^#SBATCH[[:space:]]\{1,\}//p' "$MIDTRAIN_REPO/training_scripts/$1.sbatch" | tr ' ' '\n' | sed '/^$/d'
}

# requested_options KIND: every sbatch option of a KIND job in the order sbatch applies them (the script's
# #SBATCH lines, then SITE_SBATCH_ARGS, then <KIND>_SBATCH_ARGS; later ones win), one per line.
requested_options() {
    local kind="$1" name
    script_sbatch_lines "$kind"
    name="$(echo "$kind" | tr '[:lower:]' '[:upper:]')_SBATCH_ARGS[@]"
    printf '%s\n' "${SITE_SBATCH_ARGS[@]+"${SITE_SBATCH_ARGS[@]}"}" "${!name+"${!name}"}" | sed '/^$/d'
}

# job_layout KIND: "DEVICES NODES" (processes per node, nodes). In a job: what SLURM allocated. In a dry run:
# what the sbatch request asks for (--gpus-per-node, else --ntasks-per-node; --nodes), never the
# SLURM_* variables of the shell that submits (an interactive allocation would leak into the preview).
job_layout() {
    local kind="$1" opts=() line devices nodes
    if [[ "$DRY_RUN" != 1 && -n "${SLURM_JOB_ID:-}" ]]; then
        echo "${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}} ${SLURM_NNODES:-1}"
        return
    fi
    while IFS= read -r line; do opts+=("$line"); done < <(requested_options "$kind")
    devices="$(sbatch_option gpus-per-node "${opts[@]+"${opts[@]}"}")"
    devices="${devices##*:}"  # --gpus-per-node=a100:4
    [[ -n "$devices" ]] || devices="$(sbatch_option ntasks-per-node "${opts[@]+"${opts[@]}"}")"
    nodes="$(sbatch_option "nodes|N" "${opts[@]+"${opts[@]}"}")"
    nodes="${nodes%%-*}"  # --nodes=2-4: the minimum
    echo "${devices:-1} ${nodes:-1}"
}

# wait_child PID: wait for a background child through any trapped signals; its exit status, or 255 when
# bash lost it (wait gives -1 when the trap interrupted it just as the child ended).
wait_child() {
    local rc=0
    while kill -0 "$1" 2>/dev/null; do wait "$1" || true; done  # a trapped signal interrupts wait early
    wait "$1" || rc=$?  # bash keeps the status of a reaped child
    return $(( rc & 255 ))
}

# requeue_task: requeue exactly this array task (SLURM_JOB_ID of an array's last task is the array's ID).
requeue_task() {
    local id="${SLURM_JOB_ID:?SLURM_JOB_ID is not set}"
    [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]] && id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    note "preempted: requeueing job $id; it resumes from its newest checkpoint"
    ${MIDTRAIN_SCONTROL:-scontrol} requeue "$id" \
        || die "scontrol requeue $id failed; submit the same configs again to continue from the checkpoint"
}

# run_task COMMAND...: run one job step; when a task of it was preempted, requeue this task.
# The step runs in the background so that this (batch) shell can forward the preemption signal to it:
# a site's --signal=B:USR1@... reaches only the batch shell, which would otherwise die of it.
run_task() {
    local marker="$1" rc=0 child; shift
    mkdir -p "$(dirname "$marker")"; rm -f "$marker"
    if (( PREEMPT_RECEIVED )); then  # only a --signal=B:... request reaches the batch shell
        note "the batch shell got SIG$PREEMPT_SIGNAL (--signal=B:...) before the job step started"
        requeue_task
        exit 0
    fi
    echo "+ $*" >&2
    "$@" &
    child=$!
    local forward="note 'the batch shell got SIG$PREEMPT_SIGNAL (--signal=B:...): forwarding it to the job step'; kill -$PREEMPT_SIGNAL $child 2>/dev/null || true"
    # shellcheck disable=SC2064
    trap "$forward" "$PREEMPT_SIGNAL"
    (( PREEMPT_RECEIVED )) && eval "$forward"  # arrived between the start of the step and this trap
    wait_child "$child" && rc=0 || rc=$?
    trap - "$PREEMPT_SIGNAL"
    if [[ -f "$marker" ]] || (( rc == EXIT_PREEMPTED )); then
        rm -f "$marker"
        requeue_task
        exit 0
    fi
    return "$rc"
}

# parse_args ARG...: sets DRY_RUN, MIDTRAIN_SITE (--site=FILE), CONFIG_ARGS (configs/lists/globs) and
# EXTRA_ARGS (after --).
parse_args() {
    DRY_RUN="${DRY_RUN:-0}"; CONFIG_ARGS=(); EXTRA_ARGS=()
    while (( $# )); do
        case "$1" in
            --dry-run) DRY_RUN=1 ;;
            --site=*) MIDTRAIN_SITE="${1#--site=}" ;;
            -h|--help) usage; exit 0 ;;
            --) shift; EXTRA_ARGS=("$@"); break ;;
            *) CONFIG_ARGS+=("$1") ;;
        esac
        shift
    done
    (( ${#CONFIG_ARGS[@]} )) || { usage >&2; exit 2; }
}

srun_prefix() {
    if [[ -n "${MIDTRAIN_SRUN+x}" ]]; then echo "$MIDTRAIN_SRUN"; else echo "srun --kill-on-bad-exit=1"; fi
}

# task_command CONFIG: the whole command of this task, one argument per line: the launcher, task.sh (sets the
# environment up inside each task, turns a preempted task into a clean end of the step), then the midtrain
# command that build_command (defined by each *.sbatch) prints for CONFIG.
# --kill-on-bad-exit stays (a crashed rank must not leave the others hanging in a collective until the
# time limit): task.sh exits 0 for a preempted task, so srun never kills a sibling rank that is still
# writing its part of the checkpoint (rank 0 exiting 75 first used to make the step end 143, FAILED).
task_command() {
    local cfg="$1" word
    for word in $(srun_prefix); do echo "$word"; done
    echo "$BASH"; echo "$MIDTRAIN_REPO/training_scripts/task.sh"
    echo "--repo=$MIDTRAIN_REPO"; echo "--site=$MIDTRAIN_SITE"; echo "--marker=$PREEMPT_MARKER"; echo --
    build_command "$cfg"
}

# launch KIND CONFIG...: the body of every sbatch script.
launch() {
    local kind="$1"; shift
    local configs=() line
    while IFS= read -r line; do configs+=("$line"); done < <(expand_configs "$@")
    cd "$MIDTRAIN_ROOT" || die "MIDTRAIN_ROOT $MIDTRAIN_ROOT does not exist"
    read -r JOB_DEVICES JOB_NODES < <(job_layout "$kind")
    PREEMPT_MARKER="$MIDTRAIN_LOG_DIR/.preempted-${SLURM_JOB_ID:-$$}"  # task.sh creates it when preempted
    [[ "$DRY_RUN" != 1 ]] || PREEMPT_MARKER="$MIDTRAIN_LOG_DIR/.preempted-\$SLURM_JOB_ID"
    local n=${#configs[@]} i cmd=()
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "# midtrain $kind: $n config(s), working directory $MIDTRAIN_ROOT, $JOB_NODES node(s) x $JOB_DEVICES process(es)"
        local ids=()
        if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then ids=("$(task_index "$n")"); else ids=($(seq 0 $((n - 1)))); fi
        for i in "${ids[@]}"; do
            cmd=(); while IFS= read -r line; do cmd+=("$line"); done < <(task_command "${configs[$i]}")
            echo "[task $i] ${cmd[*]}"
        done
        return 0
    fi
    i="$(task_index "$n")"
    note "job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): config $((i + 1)) of $n: ${configs[$i]}"
    cmd=(); while IFS= read -r line; do cmd+=("$line"); done < <(task_command "${configs[$i]}")
    run_task "$PREEMPT_MARKER" "${cmd[@]}"
}

# expand_parts ARG...: input parts of `midtrain prepare`, one per line (absolute). ARG is a file or directory
# (one input), a glob in quotes (sorted matches), or @LIST (a file, one path per line, '#' comments).
expand_parts() {
    local arg line out=()
    for arg in "$@"; do
        if [[ "$arg" == @* ]]; then
            [[ -f "${arg#@}" ]] || die "no list file ${arg#@}"
            while IFS= read -r line; do out+=("$line"); done < <(read_list "${arg#@}")
        elif [[ -e "$arg" ]]; then out+=("$arg")
        else
            local matches
            matches="$(glob_matches input "$arg")" || exit 2
            while IFS= read -r line; do out+=("$line"); done <<< "$matches"
        fi
    done
    absolute_unique "input part" "${out[@]+"${out[@]}"}"
}

# ---- evaluate: one array task per checkpoint when lm-eval tasks run (evaluate.sbatch, submit.sh) ----

# eval_wants_tasks CONFIG: the evaluation runs lm-eval tasks (--tasks among EXTRA_ARGS, or a tasks: key).
eval_wants_tasks() {
    local a
    for a in "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do [[ "$a" == --tasks || "$a" == --tasks=* ]] && return 0; done
    grep -q '^tasks:' "$1"
}

# expand_eval_items ARG...: the items of an evaluate array, one per line. A config evaluated by lm-eval tasks
# gives "CONFIG<TAB>CHECKPOINT" per checkpoint it matches (midtrain evaluate --list_checkpoints, in the site's
# environment, from MIDTRAIN_ROOT; with EXTRA_ARGS); any other config is one item. @LIST (the list submit.sh
# froze) is read as it is, so a requeued task runs the same item.
expand_eval_items() {
    if [[ $# -eq 1 && "$1" == @* ]]; then
        [[ -s "${1#@}" ]] || die "no list file ${1#@}"
        cat "${1#@}"; return
    fi
    local configs cfg found line
    configs="$(expand_config_files "$@")" || exit 2
    while IFS= read -r cfg; do
        eval_wants_tasks "$cfg" || { echo "$cfg"; continue; }
        found="$(cd "$MIDTRAIN_ROOT" && set +u && site_activate && set -u \
                 && "${MIDTRAIN_CMD:-midtrain}" evaluate --config "$cfg" "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}" \
                    --list_checkpoints=true | sed -n 's/^checkpoint: //p')" \
            || die "cannot list the checkpoints of $cfg (midtrain evaluate --list_checkpoints failed; see above)"
        [[ -n "$found" ]] || die "$cfg matches no checkpoint"
        while IFS= read -r line; do printf '%s\t%s\n' "$cfg" "$line"; done <<< "$found"
    done <<< "$configs"
}

# eval_extra_args: EXTRA_ARGS without --checkpoints (an item's checkpoint replaces them), one per line.
eval_extra_args() {
    local skip=0 a
    for a in "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do
        if (( skip )); then skip=0; continue; fi
        [[ "$a" == --checkpoints ]] && { skip=1; continue; }
        [[ "$a" == --checkpoints=* ]] && continue
        echo "$a"
    done
}
