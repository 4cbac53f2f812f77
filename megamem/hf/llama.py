"""Vanilla megamem models are Llama: same pre-norm block, RMSNorm, rotate-half RoPE, SwiGLU, GQA.
RoPE with static or dynamic NTK scaling is Llama with its rope parameters (megamem.hf.llama_rope).

Exporting one gives a native `LlamaForCausalLM` folder that loads with no remote code. Only configs
that are exactly Llama qualify (an allow-list of fields and values, not a list of known
differences), so a new model option can never be exported as Llama by mistake.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..config import ConfigError, MegamemConfig
from ..memory.placement import memory_layers
from .allow_list import ANY, INERT_MEMORY_FIELDS, differences
from .llama_rope import LLAMA_POSITIONS, llama_rope

# The ModelConfig fields a LlamaConfig expresses, with the values it expresses (ANY: every value).
# Export as native Llama only when every field is allowed here; a field not listed must keep its
# default. So a field added to megamem later exports as the megamem format until a test shows
# Llama's logits equal megamem's with it (tests/test_hf_llama.py checks every field both ways).
LLAMA_MODEL_FIELDS = {
    "hidden_dim": ANY, "num_heads": ANY, "num_kv_heads": ANY, "num_layers": ANY, "intermediate_dim": ANY,
    "vocab_size": ANY, "max_seq_len": ANY, "rope_theta": ANY, "attention_dropout": ANY, "norm_eps": ANY,
    "initializer_range": ANY, "tie_embeddings": ANY, "tokenizer_name": ANY, "bos_token_id": ANY,
    "eos_token_id": ANY, "pad_token_id": ANY,
    "use_flash_attention": ANY,  # a kernel choice: the same arithmetic
    "freeze_base_model": ANY,  # only read for adapter runs
    # RoPE (plain or NTK-scaled: llama_rope), RMSNorm, SwiGLU, multi-head/grouped-query attention (the aliases
    # resolve to the registry keys)
    "pos_encoding": LLAMA_POSITIONS, "use_rope": (True, None),
    "mlp_type": ("swiglu", None), "hidden_activation": ("silu", None), "use_rms_norm": (True,),
    "attention_type": ("mha", "standard", "gqa"),
    "dropout": (0.0,),  # Llama has no residual or embedding dropout
    "base_model_name": (None,), "load_in_4bit": (False,),
}
LLAMA_INERT_MEMORY_FIELDS = INERT_MEMORY_FIELDS  # no memory layers: these may hold any value


def llama_incompatibilities(cfg: MegamemConfig) -> List[str]:
    """Why this model is not exactly a Llama (empty: it is, and exports as LlamaForCausalLM)."""
    problems = []
    if memory_layers(cfg.memory, cfg.model.num_layers):
        problems.append("the model has memory layers (Llama has no memory cross-attention)")
    problems += differences("model", cfg.model, LLAMA_MODEL_FIELDS, "Llama")
    problems += differences("memory", cfg.memory, dict.fromkeys(LLAMA_INERT_MEMORY_FIELDS, ANY), "Llama")
    return problems


def llama_config(cfg: MegamemConfig):
    from transformers import LlamaConfig

    m = cfg.model
    rope_parameters, max_positions = llama_rope(m)
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_dim, intermediate_size=m.intermediate_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
        head_dim=m.hidden_dim // m.num_heads, max_position_embeddings=max_positions, rms_norm_eps=m.norm_eps,
        rope_parameters=rope_parameters, hidden_act="silu", attention_bias=False, mlp_bias=False,
        attention_dropout=m.attention_dropout, initializer_range=m.initializer_range,
        tie_word_embeddings=m.tie_embeddings, bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id,
        pad_token_id=m.pad_token_id)


def to_llama_state_dict(state: Dict[str, torch.Tensor], cfg: MegamemConfig) -> Dict[str, torch.Tensor]:
    """Rename and split megamem tensors (fused qkv and gate/up) into Llama's layout."""
    problems = llama_incompatibilities(cfg)
    if problems:
        raise ConfigError("this model cannot be exported as native Llama: " + "; ".join(problems))
    m = cfg.model
    hd = m.hidden_dim // m.num_heads
    q_rows, kv_rows = m.num_heads * hd, (m.num_kv_heads or m.num_heads) * hd
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    out["lm_head.weight"] = state.get("lm_head.weight", state["tok_embeddings.weight"])
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv_proj.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = state[src + "mlp.gate_up_proj.weight"].chunk(2, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "attn.o_proj.weight"],
            dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.down_proj.weight"],
        })
    if m.tie_embeddings:
        out.pop("lm_head.weight")
    used = {"tok_embeddings.weight", "norm.weight", "lm_head.weight"} | {
        f"blocks.{i}.{name}" for i in range(m.num_layers) for name in
        ("attn.qkv_proj.weight", "attn_norm.weight", "attn.o_proj.weight", "mlp_norm.weight",
         "mlp.gate_up_proj.weight", "mlp.down_proj.weight")}
    left = sorted(set(state) - used)
    if left:  # weights Llama has no place for: exporting without them would change the model
        raise ConfigError(f"this model cannot be exported as native Llama: its weights {left[:5]} have no Llama "
                          "counterpart; export it in the megamem format")
    return {k: v.contiguous() for k, v in out.items()}
