"""Vanilla megamem models are Llama: same pre-norm block, RMSNorm, rotate-half RoPE, SwiGLU, GQA.

Exporting one gives a native `LlamaForCausalLM` folder that loads with no remote code.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..config import ConfigError, MegamemConfig, mlp_type, position_type
from ..memory.placement import memory_layers


def llama_incompatibilities(cfg: MegamemConfig) -> List[str]:
    m = cfg.model
    problems = []
    if memory_layers(cfg.memory, m.num_layers):
        problems.append("the model has memory layers (Llama has no memory cross-attention)")
    if not m.use_rms_norm:
        problems.append("model.use_rms_norm is false (Llama uses RMSNorm)")
    if mlp_type(m) != "swiglu":
        problems.append(f"model.mlp_type is {mlp_type(m)} (Llama uses swiglu)")
    if position_type(m) != "rope":
        problems.append(f"model.pos_encoding.type is {position_type(m)} (Llama uses rope)")
    if m.attention_type not in ("mha", "standard", "gqa"):
        problems.append(f"model.attention_type is {m.attention_type} (Llama uses mha)")
    return problems


def llama_config(cfg: MegamemConfig):
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_dim, intermediate_size=m.intermediate_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
        head_dim=m.hidden_dim // m.num_heads, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
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
    return {k: v.contiguous() for k, v in out.items()}
