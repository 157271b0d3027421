#!/usr/bin/env bash
# Submit a training_scripts/*.sbatch job with the site's settings, as an array of one task per config.
#
#   training_scripts/submit.sh KIND [--dry-run] CONFIG|DIR|'GLOB'|LIST... [-- OVERRIDES...]
#   KIND: pretrain | finetune | evaluate
#
# Sources training_scripts/site.sh (SITE_SBATCH_ARGS, <KIND>_SBATCH_ARGS, MIDTRAIN_LOG_DIR), counts
# the configs and runs `sbatch --array=0-(N-1) ... training_scripts/KIND.sbatch ARGS`. --dry-run prints
# the sbatch command and every task's command without submitting.
set -euo pipefail

MIDTRAIN_REPO="$(cd "$(dirname "$0")/.." && pwd)"
export MIDTRAIN_REPO
# shellcheck source=training_scripts/lib.sh
source "$MIDTRAIN_REPO/training_scripts/lib.sh"
usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { usage; exit 0; }
kind="$1"; shift
case "$kind" in pretrain|finetune|evaluate) ;; *) die "unknown job kind $kind (pretrain, finetune, evaluate)" ;; esac
parse_args "$@"
load_site
n="$(expand_configs "${CONFIG_ARGS[@]}" | wc -l)"
kind_args_name="$(echo "$kind" | tr '[:lower:]' '[:upper:]')_SBATCH_ARGS[@]"
cmd=(sbatch "${SITE_SBATCH_ARGS[@]+"${SITE_SBATCH_ARGS[@]}"}" "${!kind_args_name+"${!kind_args_name}"}"
     --array="0-$((n - 1))" --output="${MIDTRAIN_LOG_DIR:-logs}/%x-%A_%a.out"
     "$MIDTRAIN_REPO/training_scripts/$kind.sbatch" "${CONFIG_ARGS[@]}" -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}")
if [[ "$DRY_RUN" == 1 ]]; then
    echo "${cmd[*]}"
    DRY_RUN=1 bash "${cmd[@]: -$((${#CONFIG_ARGS[@]} + ${#EXTRA_ARGS[@]} + 2))}"
else
    mkdir -p "${MIDTRAIN_LOG_DIR:-logs}"
    "${cmd[@]}"
fi
