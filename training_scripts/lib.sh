# Shared helpers of training_scripts/*.sbatch and submit.sh (sourced, not run).
#
# Environment knobs (all optional):
#   MIDTRAIN_SITE   site file to source (default training_scripts/site.sh)
#   MIDTRAIN_CMD    the midtrain executable (default: midtrain); tests point it at a stub
#   MIDTRAIN_SRUN   launcher prefix (default: srun --kill-on-bad-exit=1; empty = run directly)
#   DRY_RUN=1       print the command(s) of every array task instead of running
#   SLURM_*         set by SLURM: SLURM_ARRAY_TASK_ID, SLURM_JOB_ID, SLURM_NNODES, SLURM_GPUS_ON_NODE

EXIT_PREEMPTED=75  # midtrain exits with this after a preemption checkpoint: requeue the task

die() { echo "midtrain-sbatch: error: $*" >&2; exit 2; }

load_site() {
    local site="${MIDTRAIN_SITE:-$MIDTRAIN_REPO/training_scripts/site.sh}"
    [[ -f "$site" ]] || die "no site file $site; copy training_scripts/site.example.sh to training_scripts/site.sh and edit it"
    # shellcheck disable=SC1090
    source "$site"
    MIDTRAIN_ROOT="${MIDTRAIN_ROOT:-$MIDTRAIN_REPO}"
}

# expand_configs ARG...: one config per line. ARG is a .yaml file, a directory (its *.yaml, recursive,
# sorted), a glob in quotes (sorted), or a list file (one path per line, '#' comments; order kept).
# Relative paths are taken from the current directory. Duplicates are an error (two tasks, one out_dir).
expand_configs() {
    local arg line out=()
    for arg in "$@"; do
        if [[ -d "$arg" ]]; then
            while IFS= read -r line; do out+=("$line"); done < <(find "$arg" -name '*.yaml' | LC_ALL=C sort)
        elif [[ -f "$arg" && "$arg" == *.y*ml ]]; then
            out+=("$arg")
        elif [[ -f "$arg" ]]; then
            while IFS= read -r line || [[ -n "$line" ]]; do
                line="${line%%#*}"; line="${line#"${line%%[![:space:]]*}"}"; line="${line%"${line##*[![:space:]]}"}"
                [[ -n "$line" ]] && out+=("$line")
            done < "$arg"
        else
            local matches
            matches="$(compgen -G "$arg" | LC_ALL=C sort)" || die "no config matches $arg"
            while IFS= read -r line; do out+=("$line"); done <<< "$matches"
        fi
    done
    (( ${#out[@]} )) || die "no configs given"
    local f abs seen=" "
    for f in "${out[@]}"; do
        [[ -f "$f" ]] || die "config $f does not exist"
        abs="$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"
        [[ "$seen" != *" $abs "* ]] || die "config $f is listed twice"
        seen+="$abs "
        echo "$abs"
    done
}

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

# task_config CONFIG...: the config of this array task (SLURM_ARRAY_TASK_ID, default 0 for one config).
task_index() {
    local n="$1"
    if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        (( SLURM_ARRAY_TASK_ID < n )) || die "array task $SLURM_ARRAY_TASK_ID but only $n configs (use --array=0-$((n - 1)))"
        echo "$SLURM_ARRAY_TASK_ID"
    elif (( n == 1 )); then echo 0
    else die "$n configs but no SLURM_ARRAY_TASK_ID; submit with --array=0-$((n - 1)) (training_scripts/submit.sh does)"
    fi
}

# run_task COMMAND...: run under srun; on exit status 75 (preempted, checkpoint written) requeue this job.
run_task() {
    local rc=0
    echo "+ $*" >&2
    "$@" || rc=$?
    if (( rc == EXIT_PREEMPTED )); then
        echo "midtrain-sbatch: preempted (exit $rc): requeueing job ${SLURM_JOB_ID:-?}" >&2
        ${MIDTRAIN_SCONTROL:-scontrol} requeue "${SLURM_JOB_ID:?SLURM_JOB_ID is not set}"
        exit 0
    fi
    return "$rc"
}

# parse_args ARG...: sets DRY_RUN, CONFIG_ARGS (configs/lists/globs) and EXTRA_ARGS (after --).
parse_args() {
    DRY_RUN="${DRY_RUN:-0}"; CONFIG_ARGS=(); EXTRA_ARGS=()
    while (( $# )); do
        case "$1" in
            --dry-run) DRY_RUN=1 ;;
            -h|--help) usage; exit 0 ;;
            --) shift; EXTRA_ARGS=("$@"); break ;;
            *) CONFIG_ARGS+=("$1") ;;
        esac
        shift
    done
    (( ${#CONFIG_ARGS[@]} )) || { usage >&2; exit 2; }
}

# launch KIND CONFIG...: the body of every sbatch script.
#   build_command (defined by the script) prints the command for one config, one argument per line.
launch() {
    local kind="$1"; shift
    local configs=() line
    while IFS= read -r line; do configs+=("$line"); done < <(expand_configs "$@")
    cd "$MIDTRAIN_ROOT" || die "MIDTRAIN_ROOT $MIDTRAIN_ROOT does not exist"
    local n=${#configs[@]} i cmd=()
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "# midtrain $kind: $n config(s), working directory $MIDTRAIN_ROOT"
        local ids=()
        if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then ids=("$(task_index "$n")"); else ids=($(seq 0 $((n - 1)))); fi
        for i in "${ids[@]}"; do
            cmd=(); while IFS= read -r line; do cmd+=("$line"); done < <(build_command "${configs[$i]}")
            echo "[task $i] ${cmd[*]}"
        done
        return 0
    fi
    i="$(task_index "$n")"
    cmd=(); while IFS= read -r line; do cmd+=("$line"); done < <(build_command "${configs[$i]}")
    run_task "${cmd[@]}"
}

srun_prefix() {
    if [[ -n "${MIDTRAIN_SRUN+x}" ]]; then echo "$MIDTRAIN_SRUN"; else echo "srun --kill-on-bad-exit=1"; fi
}
