"""Write a Hugging Face transformers directory from a Blues checkpoint (`convert_checkpoint --to hf|hf-mixtral`).

`--to hf`: config.json (model_type "blues", architectures, auto_map), configuration_blues.py and
modeling_blues.py (this package's templates, copied), model.safetensors (parity/hf/weights.py), the
o200k tokenizer (parity/hf/tokenizer.py) and generation_config.json. Loads offline with
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` and `AutoTokenizer.from_pretrained(OUT)`.

`--to hf-mixtral`: a plain `MixtralForCausalLM` directory (no remote code), for the configs Mixtral
expresses exactly (`mixtral_refusal` names the field that prevents it otherwise).

transformers is imported inside the functions: it is an optional dependency (the dev extra).
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from blues.config import BluesConfig
from blues.errors import UsageError
from blues.tokenizer import SPECIAL_TOKENS, ENDOFTEXT
from parity.hf.tokenizer import save_tokenizer
from parity.hf.weights import to_hf, to_mixtral
from blues.safetensors_io import write_safetensors

TEMPLATES = ("configuration_blues.py", "modeling_blues.py")
AUTO_MAP = {"AutoConfig": "configuration_blues.BluesConfig",
            "AutoModelForCausalLM": "modeling_blues.BluesForCausalLM"}
WEIGHTS = "model.safetensors"
EOT = SPECIAL_TOKENS[ENDOFTEXT]


def write_hf(arrays, config: BluesConfig, staging: Path) -> Path:
    """`staging/`: the remote-code `blues` model directory."""
    from parity.hf.configuration_blues import BluesConfig as HFBluesConfig

    hf_config = HFBluesConfig(**config.to_dict(), architectures=["BluesForCausalLM"], auto_map=AUTO_MAP)
    hf_config.save_pretrained(str(staging))
    for name in TEMPLATES:
        shutil.copyfile(Path(__file__).with_name(name), staging / name)
    _write_common(to_hf(arrays, config), config, staging)
    return staging


def mixtral_refusal(config: BluesConfig) -> str | None:
    """Why MixtralForCausalLM cannot compute this config's function (None: it can)."""
    if config.use_post_norms:
        return "config field 'use_post_norms' is true; Mixtral has no post norms"
    if config.attn_logit_softcap is not None:
        return f"config field 'attn_logit_softcap' is {config.attn_logit_softcap:g}; Mixtral has no softcap"
    if config.capacity_factor is not None:
        return f"config field 'capacity_factor' is {config.capacity_factor:g}; Mixtral is dropless"
    if not config.normalize_router_weights:
        return ("config field 'normalize_router_weights' is false; Mixtral always renormalises the top-k "
                "router weights")
    return None


def check_mixtral(config: BluesConfig) -> None:
    why = mixtral_refusal(config)
    if why is not None:
        raise UsageError(f"--to hf-mixtral: {why} (use --to hf, which exports every Blues config)")


def write_hf_mixtral(arrays, config: BluesConfig, staging: Path) -> Path:
    """`staging/`: a MixtralForCausalLM directory. Router noise (training only) has no Mixtral
    counterpart and is left out; Mixtral's load-balancing loss is its own, and it has no z-loss."""
    from transformers import MixtralConfig

    check_mixtral(config)
    MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.expert_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="gelu",
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, sliding_window=None,
        num_local_experts=config.tot_num_experts, num_experts_per_tok=config.chosen_num_experts,
        router_aux_loss_coef=config.router_aux_loss_coef, router_jitter_noise=0.0, attention_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=EOT, eos_token_id=EOT, architectures=["MixtralForCausalLM"],
    ).save_pretrained(str(staging))
    _write_common(to_mixtral(arrays, config), config, staging)
    return staging


def _write_common(tensors, config: BluesConfig, staging: Path) -> None:
    """model.safetensors, the tokenizer and generation_config.json."""
    from transformers import GenerationConfig

    write_safetensors(staging / WEIGHTS, tensors, metadata={"format": "pt"})
    save_tokenizer(staging, config.max_position_embeddings)
    GenerationConfig(bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT).save_pretrained(str(staging))


def hf_usage(directory: Path, *, trust_remote_code: bool) -> str:
    """A command that loads the directory in transformers, offline, and continues a prompt."""
    remote = ", trust_remote_code=True" if trust_remote_code else ""
    model = json.dumps(str(directory.resolve()))
    code = (f'from transformers import pipeline; p = pipeline("text-generation", model={model}'
            f'{remote}); print(p("The old man said", max_new_tokens=20)[0]["generated_text"])')
    return f"  try it: HF_HUB_OFFLINE=1 python -c {shlex.quote(code)}"
