"""Exact attention of (query, chapter) pairs, grouped by chapter, memory-bounded; plus the LSE merge.

A token that reads k chapters is k pairs. Each pair's partial attention (the softmax-normalised
output over that chapter's T rows, and its log-sum-exp) is computed here; `merge_partials`
combines a token's partials into ONE softmax over the union of its chapters (`routed_attention`
does both in one Function). Pairs are sorted by chapter and padded into capacity buckets (counts
rounded up to 4 significant bits: at most 12.5 % padding), so one batched matmul serves many
chapters; chunks hold at most `chunk_elements` logits. Backward recomputes the logits chunk by
chunk (flash-style), so no [pairs, T] tensor outlives a chunk and no key is ever gathered per pair.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MB in fp32)


def _plan(chap: torch.Tensor, num_chapters: int, per_slot: int, chunk_elements: int) -> List[Tuple]:
    """[(chapter ids [n], pair ids [n, cap], valid [n, cap])], one entry per chunk.

    A chapter with more pairs than fit one chunk is split into segments (its id repeats in a chunk).
    """
    order = torch.argsort(chap, stable=True)
    counts = torch.bincount(chap, minlength=num_chapters)
    starts = torch.cumsum(counts, 0) - counts
    limit = 1 << max(0, (chunk_elements // per_slot).bit_length() - 1)  # largest power of two that fits
    used = counts.nonzero().squeeze(1)
    segs = (counts[used] + limit - 1) // limit
    seg_chap = used.repeat_interleave(segs)
    j = torch.arange(len(seg_chap), device=chap.device) - (torch.cumsum(segs, 0) - segs).repeat_interleave(segs)
    seg_start = starts[seg_chap] + j * limit
    seg_count = (counts[seg_chap] - j * limit).clamp(max=limit)
    shift = (torch.floor(torch.log2(seg_count.double())).long() - 3).clamp(min=0)
    caps = ((seg_count + (1 << shift) - 1) >> shift) << shift  # 4 significant bits: ≤ 12.5 % padding
    chunks = []
    for cap in caps.unique().tolist():
        sel = (caps == cap).nonzero().squeeze(1)
        per_chunk = max(1, chunk_elements // (cap * per_slot))
        slot = torch.arange(cap, device=chap.device)
        for i in range(0, len(sel), per_chunk):
            seg = sel[i:i + per_chunk]
            valid = slot < seg_count[seg, None]
            pairs = order[torch.where(valid, seg_start[seg, None] + slot, seg_start[seg, None])]
            chunks.append((seg_chap[seg], pairs, valid))
    return chunks


def _rows(t: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """[n·G, T, e]: the rows of chapters cs, one slice per kv group (no copy beyond the gather if G = 1)."""
    x = t[cs]
    n, T, G, e = x.shape
    return x.view(n, T, e) if G == 1 else x.permute(0, 2, 1, 3).reshape(n * G, T, e)


def _logits(q, kg, G, pairs, tok, bias, scale):
    """Chunk logits [n, G, cap, r, T] for pairs (n chapters × cap slots), G kv groups of r heads."""
    n, cap = pairs.shape
    e = kg.shape[-1]
    r = q.shape[1] // G
    qc = q[tok[pairs]].view(n, cap, G, r, e).permute(0, 2, 1, 3, 4).reshape(n * G, cap * r, e)
    s = torch.bmm(qc, kg.transpose(1, 2)).mul_(scale).view(n, G, cap, r, -1)
    return s.add_(bias[pairs].to(s.dtype).view(n, 1, cap, 1, 1)), qc


def _partials(q, keys, values, tok, chap, bias, scale, plan):
    """Every pair's softmax-normalised output [P, H, f] and log-sum-exp [P, H], chunk by chunk."""
    P, H = tok.shape[0], q.shape[1]
    _, T, G, f = values.shape
    out = q.new_empty(P, H, f)
    lse = q.new_empty(P, H)
    for cs, pairs, valid in plan:
        n, cap = pairs.shape
        kg = _rows(keys, cs)
        vg = kg if keys is values else _rows(values, cs)
        s, _ = _logits(q, kg, G, pairs, tok, bias, scale)
        m = s.amax(-1, keepdim=True)
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        p.div_(l)
        o = torch.bmm(p.view(n * G, -1, T), vg).view(n, G, cap, -1, f).permute(0, 2, 1, 3, 4).reshape(n, cap, H, f)
        ls = (m + l.log()).squeeze(-1).permute(0, 2, 1, 3).reshape(n, cap, H)
        out[pairs[valid]] = o[valid]
        lse[pairs[valid]] = ls[valid]
    return out, lse


def _grads(q, keys, values, tok, bias, scale, plan, row, grad, stab, offset, touched=None):
    """Gradients (dq, dk, dv, dbias) of pair attention, recomputing the logits chunk by chunk.

    For the pairs of a chunk, row(pairs) indexes grad [·, H, f] (the output gradient each pair
    receives), stab and offset [·, H]: P = exp(logit − stab), ds = P ∘ (grad·Vᵀ − offset).
    Padded slots get P = 0. touched: sorted chapter ids; dk/dv then hold only those chapters.
    """
    H = q.shape[1]
    _, T, G, f = values.shape
    r, same_kv = H // G, keys is values
    slots = C = values.shape[0] if touched is None else len(touched)
    dq = torch.zeros_like(q)
    dk = q.new_zeros((slots,) + tuple(keys.shape[1:]))
    dv = dk if same_kv else q.new_zeros((C,) + tuple(values.shape[1:]))
    dbias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device)
    to_chapters = lambda t, n: t.view(n, G, T, -1).transpose(1, 2)  # noqa: E731  [nG, T, x] → [n, T, G, x]
    for cs, pairs, valid in plan:
        n, cap = pairs.shape
        grp = lambda t: t.view(n, cap, G, r).permute(0, 2, 1, 3)[..., None]  # noqa: E731  → [n, G, cap, r, 1]
        kg = _rows(keys, cs)
        vg = kg if same_kv else _rows(values, cs)
        s, qc = _logits(q, kg, G, pairs, tok, bias, scale)
        at = row(pairs)
        p = s.sub_(grp(stab[at])).exp_().mul_(valid.to(q.dtype).view(n, 1, cap, 1, 1))  # [n, G, cap, r, T]
        g = grad[at].view(n, cap, G, r, f).permute(0, 2, 1, 3, 4).reshape(n * G, cap * r, f)
        ds = torch.bmm(g, vg.transpose(1, 2)).view(n, G, cap, r, T).sub_(grp(offset[at])).mul_(p)
        ds_f = ds.view(n * G, cap * r, T)
        dq_c = torch.bmm(ds_f, kg).mul_(scale).view(n, G, cap, r, -1).permute(0, 2, 1, 3, 4).reshape(n, cap, H, -1)
        dq.index_add_(0, tok[pairs].flatten(), dq_c.flatten(0, 1))
        dk_c = torch.bmm(ds_f.transpose(1, 2), qc).mul_(scale)  # [nG, T, e]
        dv_c = torch.bmm(p.view(n * G, cap * r, T).transpose(1, 2), g)  # [nG, T, f]
        idx = cs if touched is None else torch.searchsorted(touched, cs)
        if same_kv:
            dk.index_add_(0, idx, to_chapters(dk_c.add_(dv_c), n))
        else:
            dk.index_add_(0, idx, to_chapters(dk_c, n))
            dv.index_add_(0, idx, to_chapters(dv_c, n))
        db = ds.sum(dim=(1, 3, 4))  # [n, cap]
        dbias[pairs[valid]] = db[valid]
    return dq, dk, dv, dbias.to(bias.dtype)


class _PairAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, values, tok, chap, bias, scale, chunk_elements):
        plan = _plan(chap, values.shape[0], q.shape[1] * values.shape[1], chunk_elements)
        out, lse = _partials(q, keys, values, tok, chap, bias, scale, plan)
        ctx.save_for_backward(q, keys, values, tok, bias, out, lse)
        ctx.plan, ctx.scale, ctx.same_kv = plan, scale, keys is values
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, keys, values, tok, bias, out, lse = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        offset = (d_out * out).sum(-1).sub_(d_lse)  # [P, H]
        dq, dk, dv, dbias = _grads(q, keys, keys if ctx.same_kv else values, tok, bias, ctx.scale, ctx.plan,
                                   lambda pairs: pairs, d_out, lse, offset)
        return (dq, dk, None if ctx.same_kv else dv, None, None, dbias, None, None)


def pair_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tok: torch.Tensor,
                   chap: torch.Tensor, bias: torch.Tensor, scale: float, chunk_elements: int = CHUNK_ELEMENTS):
    """Partial attention of each pair p = (tok[p], chap[p]).

    q [N, H, e] (per token), keys [C, T, G, e], values [C, T, G, f] (G kv groups; heads H = G·r),
    bias [P] added to every logit of the pair (the router's gate). Returns (out [P, H, f], lse [P, H]):
    out is softmax-normalised within the chapter. Pass the same tensor as keys and values to
    share storage and gradient (the absorbed formulation reads raw bank rows as both).
    """
    return _PairAttention.apply(q, keys, values, tok, chap, bias, scale, chunk_elements)


def _as_chapters(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.view(-1, rows, 1, t.shape[-1]) if rows else t


class _RoutedAttention(torch.autograd.Function):
    """Pair attention with the merge inside: one softmax per token over the union of its m chapters.

    Backward is flash-attention's over that union: with P = exp(logit − LSE_token) and
    D = dy·y per token, ds = P ∘ (dy·Vᵀ − D), so no per-pair output or gradient of width f is
    ever stored. With `rows` the keys/values are a bank [C·T, d] read in place: its gradient
    holds only the touched chapters (a row-sparse COO tensor with `sparse`), never a bank-sized
    buffer in the loop.
    """

    @staticmethod
    def forward(ctx, q, keys, values, chap, bias, scale, m, rows, sparse, chunk_elements):
        N, H = q.shape[:2]
        k = _as_chapters(keys, rows)
        v = k if keys is values else _as_chapters(values, rows)
        tok = torch.arange(N, device=q.device).repeat_interleave(m)
        plan = _plan(chap, v.shape[0], H * v.shape[1], chunk_elements)
        out, lse = _partials(q, k, v, tok, chap, bias, scale, plan)
        lse = lse.view(N, m, H)
        total = torch.logsumexp(lse, 1)  # [N, H]
        w = lse.sub_(total[:, None]).exp_()[..., None]  # [N, m, H, 1]
        out = out.view(N, m, H, -1)
        y = out[:, 0] * w[:, 0]
        for i in range(1, m):  # one pass over the partials, no [N, m, H, f] temporary
            y.addcmul_(out[:, i], w[:, i])
        ctx.save_for_backward(q, keys, values, chap, bias, y, total)
        ctx.plan, ctx.scale, ctx.m, ctx.rows, ctx.sparse = plan, scale, m, rows, sparse
        return y

    @staticmethod
    def backward(ctx, dy):
        q, keys, values, chap, bias, y, total = ctx.saved_tensors
        same_kv, rows = keys is values, ctx.rows
        k = _as_chapters(keys, rows)
        v = k if same_kv else _as_chapters(values, rows)
        tok = torch.arange(q.shape[0], device=q.device).repeat_interleave(ctx.m)
        dy = dy.contiguous()
        touched = torch.unique(chap) if rows else None  # a bank: gradients of the touched chapters only
        dq, dk, dv, dbias = _grads(q, k, v, tok, bias, ctx.scale, ctx.plan, lambda pairs: tok[pairs], dy, total,
                                   (dy * y).sum(-1), touched)
        if rows:
            dk, dv = (_bank_grad(g, touched, keys.shape, ctx.sparse) for g in (dk, dv))
        return (dq, dk, None if same_kv else dv, None, dbias, None, None, None, None, None)


def _bank_grad(g: torch.Tensor, uniq: torch.Tensor, shape, sparse: bool) -> torch.Tensor:
    """[U, T, 1, d] gradients of chapters uniq → the bank's gradient [C·T, d] (row-sparse or dense)."""
    T, d = g.shape[1], shape[-1]
    if sparse:
        idx = (uniq[:, None] * T + torch.arange(T, device=g.device)).reshape(1, -1)
        return torch.sparse_coo_tensor(idx, g.reshape(-1, d), shape, check_invariants=False, is_coalesced=True)
    return g.new_zeros(shape[0] // T, T, d).index_copy_(0, uniq, g.view(-1, T, d)).view(shape)


def routed_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chap: torch.Tensor,
                     bias: torch.Tensor, scale: float, rows: int = 0, sparse: bool = False,
                     chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Token n reads chapters chap.view(N, m)[n] (bias likewise) with one softmax over them → [N, H, f].

    keys/values as in `pair_attention`, or, with rows = T, a bank [C·T, d] read in place (pass
    it as both keys and values for the absorbed formulation; `sparse` makes its gradient row-sparse).
    Equals `merge_partials` of `pair_attention`, with a cheaper backward.
    """
    m = chap.numel() // q.shape[0]
    return _RoutedAttention.apply(q, keys, values, chap, bias, scale, m, rows, sparse, chunk_elements)


def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """[N, k, H, f] partials + [N, k, H] log-sum-exps → [N, H, f]: one softmax over the k chapters."""
    w = torch.softmax(lse, dim=1)
    return (w.unsqueeze(-1) * out).sum(1)
