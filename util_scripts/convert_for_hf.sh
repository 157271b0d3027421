#!/usr/bin/env bash
# Convert a midtrain checkpoint to a Hugging Face state dict (for transformers / lm-eval) via litgpt.
#
#   util_scripts/convert_for_hf.sh CHECKPOINT_DIR OUTPUT_DIR
#   util_scripts/convert_for_hf.sh out/pythia-160m/midtrain/code20-from6k/step-00061035 hf/code20-160m
#
# CHECKPOINT_DIR is a complete midtrain checkpoint (step-XXXXXXXX/ with COMPLETE). Its lit_model.pth
# holds {"model": ..., "optimizer": ...}; `litgpt convert_from_litgpt` unwraps the "model" key and
# ignores the optimizer, and reads model_config.yaml next to it. The result is OUTPUT_DIR/model.pth
# (HF parameter names) plus the tokenizer files and model_config.yaml copied from the checkpoint.
# For a named Pythia model, load it with transformers:
#   from transformers import AutoModelForCausalLM
#   import torch
#   model = AutoModelForCausalLM.from_pretrained("EleutherAI/pythia-160m",
#                                                state_dict=torch.load("hf/code20-160m/model.pth"))
#   model.save_pretrained("hf/code20-160m/hf")   # a self-contained HF directory (config.json + weights)
# and for lm-eval: lm_eval --model hf --model_args pretrained=hf/code20-160m/hf,tokenizer=EleutherAI/pythia-160m
# (or `litgpt evaluate CHECKPOINT_DIR` directly, which converts internally).
#
# Environment: LITGPT (default: litgpt) is the litgpt executable.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[[ $# -eq 2 ]] || { usage >&2; exit 2; }
ckpt="$1" out="$2"

[[ -d "$ckpt" ]] || { echo "convert_for_hf: $ckpt is not a directory" >&2; exit 2; }
[[ -f "$ckpt/COMPLETE" ]] || { echo "convert_for_hf: $ckpt is not a complete midtrain checkpoint (no COMPLETE marker)" >&2; exit 2; }
for f in lit_model.pth model_config.yaml; do
    [[ -f "$ckpt/$f" ]] || { echo "convert_for_hf: $ckpt has no $f" >&2; exit 2; }
done

mkdir -p "$out"
"${LITGPT:-litgpt}" convert_from_litgpt "$ckpt" "$out"
for f in model_config.yaml tokenizer.json tokenizer_config.json generation_config.json config.json; do
    [[ -f "$ckpt/$f" ]] && cp "$ckpt/$f" "$out/"
done
echo "convert_for_hf: wrote $out/model.pth (HF parameter names)"
