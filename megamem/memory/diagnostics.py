"""Is the memory used? Attention entropy over the bank rows a token reads, estimated cheaply.

Computed only for forwards with diagnostics switched on (the training loop's logging steps), from
the q/k the attention already holds: the probabilities are recomputed in fp32 for at most
SAMPLE_TOKENS query positions, evenly spaced over the batch's tokens (exact when the batch has no
more), all heads; nothing of size tokens × rows is materialised. The entropy is averaged over
those positions and heads; `rows` is how many rows each of them read (the whole bank, or the
chosen chapters' rows), so entropy / log(rows) is 1 for uniform attention and 0 for one-hot.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

SAMPLE_TOKENS = 64  # query positions the entropy is estimated from
ROW_CHUNK = 8  # sampled tokens whose chapter rows are gathered at once (token routing)


def sample_positions(n: int, device) -> torch.Tensor:
    """At most SAMPLE_TOKENS positions of n, evenly spaced, first and last included."""
    return torch.linspace(0, n - 1, min(n, SAMPLE_TOKENS), device=device).round().long().unique()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim, per row."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def summary(ent: torch.Tensor, rows: int) -> Dict[str, torch.Tensor]:
    """Mean entropy, and divided by log(rows read) (a single row read: 0)."""
    mean = ent.float().mean()
    return {"entropy": mean, "entropy_norm": mean / math.log(rows) if rows > 1 else mean * 0}


@torch.no_grad()
def dense_entropy(q: torch.Tensor, k: torch.Tensor, scale: float, top_k: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """q [1, H, n, hd] (batch folded into n), k [1, KV, N, hd]: every token reads all N rows, or with top_k
    (memory.memory_top_k) only its top_k best-scoring rows: the entropy of the softmax over those."""
    idx = sample_positions(q.shape[2], q.device)
    H, N = q.shape[1], k.shape[2]
    keys = k[0].float().repeat_interleave(H // k.shape[1], 0)  # [H, N, hd]
    logits = q[0][:, idx].float() @ keys.transpose(1, 2) * scale  # [H, n, N]
    rows = N if top_k is None else min(top_k, N)
    if rows < N:
        logits = logits.topk(rows, dim=-1).values
    return summary(entropy(logits), rows)


@torch.no_grad()
def sequence_entropy(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], rows_per_chapter: int,
                     scale: float) -> Dict[str, torch.Tensor]:
    """Sequence routing: q [B, H, S, hd]; k [B, KV, m·T, hd] the chosen chapters' rows of each sequence;
    bias [B, m] the log-gates added to each chapter's logits (None: not applied)."""
    B, H, S, _ = q.shape
    idx = sample_positions(B * S, q.device)
    ents = []
    for b in idx.div(S, rounding_mode="floor").unique().tolist():
        pos = idx[idx.div(S, rounding_mode="floor") == b] - b * S
        keys = k[b].float().repeat_interleave(H // k.shape[1], 0)  # [H, m·T, hd]
        logits = q[b][:, pos].float() @ keys.transpose(1, 2) * scale  # [H, n, m·T]
        if bias is not None:
            logits = logits + bias[b].float().repeat_interleave(rows_per_chapter)
        ents.append(entropy(logits).flatten())
    return summary(torch.cat(ents), k.shape[2])


@torch.no_grad()
def token_entropy(q_abs: torch.Tensor, memory: torch.Tensor, chapters: torch.Tensor, bias: torch.Tensor,
                  rows_per_chapter: int, scale: float) -> Dict[str, torch.Tensor]:
    """Token routing (absorbed form): q_abs [N, H, d] = q·W_k per head, memory [C·T, d] raw rows,
    chapters/bias [N, m]: each token reads its m chapters' rows."""
    idx = sample_positions(q_abs.shape[0], q_abs.device)
    bank = memory.float().view(-1, rows_per_chapter, memory.shape[-1])
    ents = []
    for part in idx.split(ROW_CHUNK):
        rows = bank[chapters[part]].flatten(1, 2)  # [n, m·T, d]
        logits = torch.einsum("nhd,nrd->nhr", q_abs[part].float(), rows) * scale
        ents.append(entropy(logits + bias[part].float().repeat_interleave(rows_per_chapter, 1)[:, None]).flatten())
    return summary(torch.cat(ents), chapters.shape[1] * rows_per_chapter)
