"""Sequence routing's two exact formulations: K/V projected once for the batch, or absorbed.

Each sequence b reads R = m·T rows (its m chapters). Projecting K/V per sequence costs B·R rows
although sequences often share chapters, so:

- projected: the union of the batch's chapters is projected once (U ≤ B·m chapters), each
  sequence's K/V are indexed out of it. Cost 4·U·T·d·kv·hd + 4·B·S·H·R·hd flops (forward).
- absorbed: logits = (q·W_kᵀ)·Mᵀ and out = (p·M)·W_vᵀ per head against the raw bank rows, nothing
  projected. Cost 4·B·S·H·hd·d + 4·B·S·H·R·d: cheaper only when few queries read many rows
  (S·H·(d − hd) < U·T·d·kv·hd / (B·R)), e.g. short sequences over a wide union.

`auto` picks the cheaper per call. Both run SDPA's fused kernel: the router's gate bias rides
in an extra q/k column, and q, k, v are zero-padded to one width that is a multiple of 8 (the
CPU flash kernel needs q/k and v of one width; otherwise SDPA falls back to its math path,
which materialises [B, H, S, R] probabilities and was 2.6× slower at B=8, S=256, R=2,048).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import sdpa
from .sparse_rows import gather_chapters

PAD = 8  # q/k/v widths are rounded up to a multiple of this when the gate column is added


def union_rows(memory: torch.Tensor, chapters: torch.Tensor, rows_per_chapter: int, sparse: bool):
    """(rows [U, T, d] of the batch's distinct chapters, index [B, m] into them); index None when
    no chapter repeats (rows are then [B, m, T, d], one per sequence and pick, as indexed)."""
    uniq, inv = torch.unique(chapters, return_inverse=True)
    if len(uniq) == chapters.numel():
        return gather_chapters(memory, chapters, rows_per_chapter, sparse), None
    return gather_chapters(memory, uniq, rows_per_chapter, sparse), inv


def projected_kv(memory, chapters, rows_per_chapter: int, k_proj, v_proj, kv_heads: int, head_dim: int,
                 sparse: bool):
    """K/V [B, kv, m·T, hd] of each sequence's chapters; every distinct chapter projected once."""
    B = chapters.shape[0]
    rows, inv = union_rows(memory, chapters, rows_per_chapter, sparse)

    def per_sequence(t):
        t = t if inv is None else t[inv]  # [B, m, T, kv·hd]
        return t.view(B, -1, kv_heads, head_dim).transpose(1, 2)
    return per_sequence(k_proj(rows)), per_sequence(v_proj(rows))


def with_gate(q, k, v, bias, rows_per_chapter: int, scale: float):
    """q [B, H, S, e], k/v [B, G, R, e], bias [B, m] → (q, k, v) widened by the gate column
    (q: 1, k: bias / scale per row, v: 0) and zero-padded to a multiple of PAD."""
    B, G, R, e = k.shape
    pad = -(e + 1) % PAD
    col = (bias.to(k.dtype) / scale).repeat_interleave(rows_per_chapter, 1)[:, None, :, None].expand(B, G, R, 1)
    zeros = k.new_zeros(B, G, R, pad)
    k = torch.cat([k, col, zeros], -1)
    q = torch.cat([q, q.new_ones(*q.shape[:-1], 1), q.new_zeros(*q.shape[:-1], pad)], -1)
    return q, k, F.pad(v, (0, 1 + pad))


def attend(q, k, v, bias, rows_per_chapter: int, scale: float) -> torch.Tensor:
    """SDPA of q [B, H, S, e] over k/v [B, G, R, e] with the gate bias [B, m] on each chapter's
    logits; bias without grad is 0 in value and left out. → [B, H, S, e]."""
    e = v.shape[-1]
    if bias.requires_grad:  # a mask with grad would force SDPA's math path
        q, k, v = with_gate(q, k, v, bias, rows_per_chapter, scale)
    y = sdpa(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return y[..., :e]


def absorbed_attention(q, memory, chapters, rows_per_chapter: int, wk, wv, bias, scale: float, sparse: bool):
    """q [B, S, H, hd]; wk, wv [H, hd, d] (per head); rows read raw → [B, S, H, hd]."""
    B = q.shape[0]
    rows = gather_chapters(memory, chapters, rows_per_chapter, sparse).flatten(1, 2).to(q.dtype)  # [B, R, d]
    q_abs = torch.einsum("bshe,hed->bhsd", q, wk.to(q.dtype))
    kv = rows[:, None]  # [B, 1, R, d]: one "kv head" shared by all heads
    y = attend(q_abs, kv, kv, bias, rows_per_chapter, scale)  # [B, H, S, d]
    return torch.einsum("bhsd,hed->bshe", y, wv.to(y.dtype)).reshape(B, q.shape[1], -1)


def absorbed_is_cheaper(B: int, S: int, H: int, hd: int, d: int, kv: int, rows_read: int, rows_projected: int) -> bool:
    """Flop count of the two formulations (the module docstring's), forward; backward scales alike."""
    projected = rows_projected * d * kv * hd + B * S * H * rows_read * hd
    absorbed = B * S * H * hd * d + B * S * H * rows_read * d
    return absorbed < projected

