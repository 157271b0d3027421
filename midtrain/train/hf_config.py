"""The Hugging Face ``config.json`` of a litgpt model, written into every checkpoint and ``final/``.

litgpt's ``convert_from_litgpt`` writes only the weights; ``transformers`` (and lm-eval's ``HFLM``,
which ``litgpt evaluate`` uses) also need a ``config.json`` describing the architecture. It is
generated here from the litgpt :class:`~litgpt.config.Config` the weights were trained with, never
copied from a tokenizer directory (that one describes whatever model the tokenizer came from).

Two families are described: GPT-NeoX (Pythia; litgpt's default ``GptNeoxMLP`` + ``LayerNorm``) and
Llama (``LLaMAMLP`` + ``RMSNorm``, full rotary, sequential residual). Anything else, or a feature
these two HF classes cannot express, is refused in one line (:class:`UnsupportedFamily`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from litgpt.config import Config

from midtrain.errors import MidtrainError

log = logging.getLogger(__name__)

HF_CONFIG_FILE = "config.json"
# Names litgpt's converter routes to a weight layout of their own (falcon, gemma, phi, qwen, olmo).
_OWN_LAYOUT_PREFIXES = ("falcon", "gemma", "phi", "qwen", "qwq", "olmo")


_warned: list[bool] = []  # warn once per process, not at every checkpoint


class UnsupportedFamily(MidtrainError):
    """The model cannot be described as a GPT-NeoX or Llama ``config.json``."""


def hf_config(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict for ``config`` (a litgpt Config or its ``model_config.yaml`` dict)."""
    if isinstance(config, dict):
        config = Config(**config)
    own_layout = config.name.lower().startswith(_OWN_LAYOUT_PREFIXES)
    _refuse_unless(not own_layout, config, "a name litgpt converts with a weight layout of its own")
    common = {
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.block_size,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    _check_shared(config)
    if config.mlp_class_name == "GptNeoxMLP" and config.norm_class_name == "LayerNorm":
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **common, **_neox(config)}
    if config.mlp_class_name == "LLaMAMLP" and config.norm_class_name == "RMSNorm":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, **_llama(config)}
    raise UnsupportedFamily(_refusal(config, f"mlp {config.mlp_class_name} with {config.norm_class_name}"))


def hf_config_json(config: Config | dict[str, Any]) -> str:
    """:func:`hf_config` as the text of ``config.json``."""
    return json.dumps(hf_config(config), indent=2) + "\n"


def hf_config_files(model_config: dict[str, Any]) -> dict[str, str]:
    """``{"config.json": text}`` for a checkpoint, or ``{}`` with a one-line warning for a refused family."""
    try:
        return {HF_CONFIG_FILE: hf_config_json(model_config)}
    except UnsupportedFamily as err:
        if not _warned:
            log.warning(str(err))
            _warned.append(True)
        return {}


def _neox(config: Config) -> dict[str, Any]:
    _refuse_unless(config.head_size * config.n_head == config.n_embd, config, "head_size * n_head != n_embd")
    _refuse_unless(config.n_query_groups == config.n_head, config, "grouped-query attention")
    _refuse_unless(config.bias, config, "bias=False (HF GPT-NeoX always has MLP biases)")
    act = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(config.gelu_approximate)
    _refuse_unless(act is not None, config, f"gelu_approximate={config.gelu_approximate!r}")
    return {
        "hidden_act": act,
        "rotary_pct": config.rotary_percentage,
        "rotary_emb_base": config.rope_base,
        "use_parallel_residual": config.parallel_residual,
        "layer_norm_eps": config.norm_eps,
        "attention_bias": True,
    }


def _llama(config: Config) -> dict[str, Any]:
    _refuse_unless(config.rotary_percentage == 1.0, config, f"rotary_percentage={config.rotary_percentage}")
    _refuse_unless(not config.parallel_residual, config, "parallel_residual")
    _refuse_unless(config.bias or not config.attn_bias, config, "attn_bias without bias")
    return {
        "hidden_act": "silu",
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
    }


def _check_shared(config: Config) -> None:
    """Features neither HF class has."""
    extras = {
        "norm_qk": config.norm_qk, "post_attention_norm": config.post_attention_norm,
        "post_mlp_norm": config.post_mlp_norm, "shared_attention_norm": config.shared_attention_norm,
        "sliding_window_size": config.sliding_window_size, "attention_scores_scalar": config.attention_scores_scalar,
        "attention_logit_softcapping": config.attention_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping, "rope_adjustments": config.rope_adjustments,
        "rope_interleave": config.rope_interleave, "rope_condense_ratio": config.rope_condense_ratio != 1,
        "n_expert": config.n_expert, "scale_embeddings": config.scale_embeddings,
        "lm_head_bias": config.lm_head_bias, "latent_attention": config.latent_attention,
    }  # fmt: skip
    used = [name for name, value in extras.items() if value]
    _refuse_unless(not used, config, ", ".join(used))


def _refuse_unless(ok: bool, config: Config, what: str) -> None:
    if not ok:
        raise UnsupportedFamily(_refusal(config, what))


def _refusal(config: Config, what: str) -> str:
    return (
        f"No HF config.json for model {config.name!r}: {what} is not describable as GPT-NeoX or Llama "
        f"(the families midtrain writes); convert it with litgpt and supply a config.json by hand."
    )
