"""Vanilla MLA megamem models are DeepSeek-V3 without its mixture of experts.

Same pre-norm block, RMSNorm, multi-head latent attention (q_a_proj → q_a_layernorm → q_b_proj or
one q_proj, kv_a_proj_with_mqa → kv_a_layernorm → kv_b_proj, o_proj), a dense SwiGLU MLP in every
layer (first_k_dense_replace = num_layers: no MoE layer is built) and no multi-token-prediction
module. megamem rotates the rope part rotate-half (pairs i, i + d/2), which is DeepSeek-V3 with
rope_interleave false, so the weights copy over unpermuted. Exporting one gives a native
`DeepseekV3ForCausalLM` folder that loads with no remote code.

Only configs that are exactly DeepSeek-V3 qualify (an allow-list, megamem.hf.allow_list): memory
layers, PEER, an attractor, sliding windows, dropout or other positions keep the megamem format.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..config import ConfigError, MegamemConfig, PositionEncodingConfig
from ..memory.placement import memory_layers
from .allow_list import ANY, INERT_MEMORY_FIELDS, differences

FAMILY = "DeepSeek-V3"
# The ModelConfig fields a DeepseekV3Config expresses, with the values it expresses (ANY: every value);
# a field not listed must keep its default (tests/test_deepseek_v3_allow_list.py checks every field both ways).
DEEPSEEK_V3_MODEL_FIELDS = {
    "hidden_dim": ANY, "num_heads": ANY, "num_layers": ANY, "intermediate_dim": ANY, "vocab_size": ANY,
    "max_seq_len": ANY, "rope_theta": ANY, "attention_dropout": ANY, "initializer_range": ANY,
    "tie_embeddings": ANY, "tokenizer_name": ANY, "bos_token_id": ANY, "eos_token_id": ANY, "pad_token_id": ANY,
    "num_kv_heads": ANY,  # mla takes only null or num_heads (config validation): every head reads the latent
    "use_flash_attention": ANY,  # a kernel choice: the same arithmetic
    "freeze_base_model": ANY,  # only read for adapter runs
    "attention_type": ("mla",),
    "mla_config": ANY,  # its own fields: DEEPSEEK_V3_MLA_FIELDS
    # decoupled RoPE on the rope part, SwiGLU, RMSNorm
    "pos_encoding": (PositionEncodingConfig("rope"), PositionEncodingConfig(None)), "use_rope": (True, None),
    "mlp_type": ("swiglu", None), "hidden_activation": ("silu", None), "use_rms_norm": (True,),
    # q_a_layernorm and kv_a_layernorm are built with eps 1e-6 whatever rms_norm_eps says
    "norm_eps": (1e-6,),
    "dropout": (0.0,),  # DeepSeek-V3 has no residual or embedding dropout
    "base_model_name": (None,), "load_in_4bit": (False,),
}
# MLAConfig: every width maps onto a DeepseekV3Config field (q_lora_rank 0 or null: one q_proj)
DEEPSEEK_V3_MLA_FIELDS = {"q_lora_rank": ANY, "kv_lora_rank": ANY, "qk_rope_head_dim": ANY, "qk_nope_head_dim": ANY,
                          "v_head_dim": ANY, "rope_theta": ANY}
DEEPSEEK_V3_INERT_MEMORY_FIELDS = INERT_MEMORY_FIELDS  # no memory layers: these may hold any value


def deepseek_v3_incompatibilities(cfg: MegamemConfig) -> List[str]:
    """Why this model is not exactly a DeepSeek-V3 (empty: it is, and exports as DeepseekV3ForCausalLM)."""
    problems = []
    if memory_layers(cfg.memory, cfg.model.num_layers):
        problems.append(f"the model has memory layers ({FAMILY} has no memory cross-attention)")
    problems += differences("model", cfg.model, DEEPSEEK_V3_MODEL_FIELDS, FAMILY)
    problems += differences("model.mla_config", cfg.model.mla_config, DEEPSEEK_V3_MLA_FIELDS, FAMILY)
    problems += differences("memory", cfg.memory, dict.fromkeys(DEEPSEEK_V3_INERT_MEMORY_FIELDS, ANY), FAMILY)
    return problems


def deepseek_v3_config(cfg: MegamemConfig):
    from transformers import DeepseekV3Config

    m, c = cfg.model, cfg.model.mla_config
    return DeepseekV3Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_dim, intermediate_size=m.intermediate_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank, qk_rope_head_dim=c.qk_rope_head_dim,
        qk_nope_head_dim=c.qk_nope_head_dim, v_head_dim=c.v_head_dim,
        # a dense MLP in every layer (no MoE layer is built, no expert declared) and no MTP module
        first_k_dense_replace=m.num_layers, n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=None,
        n_group=None, topk_group=None, num_mtp_layers=0,
        hidden_act="silu", max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta or m.rope_theta)},
        rope_interleave=False, attention_bias=False, attention_dropout=m.attention_dropout,
        initializer_range=m.initializer_range, tie_word_embeddings=m.tie_embeddings,
        bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id, pad_token_id=m.pad_token_id)


def attention_weights(cfg: MegamemConfig) -> List[str]:
    """An MLA layer's weights: the same names in megamem (blocks.i.attn.*) and DeepSeek-V3 (layers.i.self_attn.*)."""
    q = ("q_a_proj", "q_a_layernorm", "q_b_proj") if cfg.model.mla_config.q_lora_rank else ("q_proj",)
    return [f"{name}.weight" for name in (*q, "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")]


def to_deepseek_v3_state_dict(state: Dict[str, torch.Tensor], cfg: MegamemConfig) -> Dict[str, torch.Tensor]:
    """Rename megamem tensors into DeepSeek-V3's layout (the fused gate/up projection split in two)."""
    problems = deepseek_v3_incompatibilities(cfg)
    if problems:
        raise ConfigError(f"this model cannot be exported as native {FAMILY}: " + "; ".join(problems))
    m, attention = cfg.model, attention_weights(cfg)
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    used = {"tok_embeddings.weight", "norm.weight", "lm_head.weight"}
    if not m.tie_embeddings:
        out["lm_head.weight"] = state.get("lm_head.weight", state["tok_embeddings.weight"])
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        gate, up = state[src + "mlp.gate_up_proj.weight"].chunk(2, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.down_proj.weight"],
        })
        out.update({dst + "self_attn." + name: state[src + "attn." + name] for name in attention})
        used |= {src + name for name in ("attn_norm.weight", "mlp_norm.weight", "mlp.gate_up_proj.weight",
                                         "mlp.down_proj.weight", *("attn." + a for a in attention))}
    left = sorted(set(state) - used)
    if left:  # weights DeepSeek-V3 has no place for: exporting without them would change the model
        raise ConfigError(f"this model cannot be exported as native {FAMILY}: its weights {left[:5]} have no "
                          f"{FAMILY} counterpart; export it in the megamem format")
    return {k: v.contiguous() for k, v in out.items()}
