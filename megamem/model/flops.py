"""FLOP accounting shared by every model kind (megamem's own and adapters on HF bases).

`flops_per_token` is the one definition of model FLOPs per token (MFU in megamem.train.metrics);
it and its pieces live in the model layer so that adapter models, pipeline stages and training all
count the same way without importing upwards.
"""
from __future__ import annotations

from typing import Optional

import torch


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter (a ZeRO-3 rank holds a shard of it locally)."""
    return getattr(p, "ds_numel", p.numel())


def weight_flops(params, skip=()) -> float:
    """Matmul FLOPs per token of the given weights in one training step: 2 (forward) + 2 (gradient of the
    input) + 2 (gradient of the weight, trainable weights only) per weight element."""
    skip_ids = {id(p) for p in skip}
    unique = {id(p): p for p in params if id(p) not in skip_ids}.values()
    return sum((6 if p.requires_grad else 4) * full_numel(p) for p in unique)


def memory_rows_read(mem) -> int:
    """Bank rows each token attends to: the whole bank, or with chapters only the chapters it reads."""
    if not mem.use_chapters:
        return mem.num_memory_tokens
    per_chapter = mem.tokens_per_chapter or mem.num_memory_tokens // mem.num_chapters
    return (mem.top_k_chapters + mem.num_shared_chapters) * per_chapter


def flops_per_token(model, seq_len: int, batch: Optional[int] = None) -> float:
    """Model FLOPs per trained token — the one definition behind MFU (FLOPs computed / measured peak).

    Weights: 6 per trainable and 4 per frozen weight element (no weight gradient), embeddings and
    banks excluded (lookups, not matmuls); the LM head counts (tied: the embedding matrix again).
    Self-attention: QKᵀ and PV over an average causal context of seq_len/2 (a sliding window w < seq_len:
    w·(seq_len − w/2)/seq_len; bidirectional attention: seq_len), ×3 for training, at each attention's widths (`qk_width`, `v_width` over
    all heads; hidden_dim when it names none — MLA's are heads·(qk_nope + qk_rope) and heads·v_head_dim,
    its training form).
    Memory attention: QKᵀ and PV over the bank rows a token reads (`memory_rows_read`: with chapters,
    its chapters only). With `batch`, a dense bank's K/V projections count as what they are — one
    projection of the bank rows per memory layer per forward, shared by batch·seq_len tokens.
    PEER layers count their chosen experts and key scores (`active_flops_per_token`), not whole tables.
    Whole-parameter sizes (ZeRO-3 shards counted whole), so every stage and layout gives one number.
    """
    if hasattr(model, "flops_per_token"):  # adapter models count their own base
        return model.flops_per_token(seq_len)
    m, mem = model.model_config, model.memory_config
    embeds = [model.tok_embeddings.weight] + list(model.pos_embeddings.parameters())  # lookups, not matmuls
    banks = [p for b in model.banks for p in b.parameters()]
    # retrieval layers (PEER) count what a token uses: its experts and the sub-key scores, not the tables
    sparse = [m.active_flops_per_token() for m in model.modules() if hasattr(m, "active_flops_per_token")]
    dense = weight_flops(model.parameters(), skip=embeds + banks + [p for ps, _ in sparse for p in ps])
    dense += sum(f for _, f in sparse)
    if m.tie_embeddings:
        dense += (6 if model.tok_embeddings.weight.requires_grad else 4) * full_numel(model.tok_embeddings.weight)
    w = getattr(m, "window_size", None)
    context = seq_len / 2 if w is None or w >= seq_len else w * (seq_len - w / 2) / seq_len
    if getattr(m, "attention_mode", "causal") == "bidirectional":
        context = seq_len
    widths = sum(getattr(b.attn, "qk_width", m.hidden_dim) + getattr(b.attn, "v_width", m.hidden_dim)
                 for b in model.blocks)
    attn = 6 * context * widths
    heads = mem.memory_num_heads or m.num_heads
    memory = 6 * 2 * len(model.memory_layers) * memory_rows_read(mem) * heads * (m.hidden_dim // heads)
    if batch is not None and not mem.use_chapters:
        kv = [p for i in model.memory_layers for proj in (model.blocks[i].memory.attn.k_proj,
                                                           model.blocks[i].memory.attn.v_proj)
              for p in proj.parameters()]
        dense += weight_flops(kv) * (mem.num_memory_tokens / (batch * seq_len) - 1)
    return dense + attn + memory
