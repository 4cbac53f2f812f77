"""Chapters: the bank split into chapters of T rows; a router picks which chapters each sequence
(or token) reads. One softmax over the union of the chosen chapters, exactly.

- sequence routing: the mean-pooled hidden state picks k chapters per sequence; their rows are
  selected by indexing the bank (never expanded across the batch); each distinct chapter of the
  batch is projected to K/V once, or (absorbed) none is: `sequence_routing_formulation: auto`
  picks the cheaper per call (megamem/memory/sequence_routing.py).
- token routing: each token picks its own chapters; (token, chapter) pairs go through
  `pair_attention` (grouped by chapter, memory-bounded) and a log-sum-exp merge. The absorbed
  formulation, logits = (q·W_kᵀ)·Mᵀ and out = (p·M)·W_vᵀ, reads raw bank rows so no bank row is
  projected and the cost is independent of the bank size; the projected formulation projects
  only the touched chapters. `token_routing_formulation: auto` picks the cheaper per call.
- generate(): `sequence` routes on the prompt, `rolling` re-routes every `rolling_interval` tokens
  on the last `rolling_window` tokens (the cached K/V of the layer are recomputed then), `token`
  routes every new token (nothing cached: the absorbed path reads bank rows directly).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional

import torch

from ..config import MemoryConfig
from .cross_attention import LowRankLinear, MemoryCrossAttention
from .diagnostics import sequence_entropy, token_entropy
from .routed_attention import merge_partials, pair_attention, routed_attention
from .router import ChapterRouter, Routing, chapter_usage, router_losses
from .sequence_routing import absorbed_attention, absorbed_is_cheaper, attend, projected_kv
from .sparse_rows import gather_chapters, keep_chapter_rows

if TYPE_CHECKING:  # the cache lives with the model; only its type is needed here
    from ..model.decoding_cache import LayerCache


def tokens_per_chapter(cfg: MemoryConfig) -> int:
    return cfg.tokens_per_chapter or cfg.num_memory_tokens // cfg.num_chapters


def build_router(hidden_dim: int, cfg: MemoryConfig) -> ChapterRouter:
    return ChapterRouter(hidden_dim, cfg.num_chapters, cfg.num_shared_chapters, cfg.top_k_chapters,
                         cfg.routed_scaling_factor)


def routing_stats(attns: Dict[int, "ChapterMemoryAttention"]):
    """(router losses averaged over the memory layers, already weighted; chapter usage per layer) of the
    last forward of each layer's chapter attention, whose stats are then cleared."""
    aux, usage = {}, {}
    for i, attn in attns.items():
        if attn.stats is None:
            continue
        _, losses, usage[i] = attn.stats
        for name, value in losses.items():
            aux[name] = aux.get(name, 0.0) + value / len(attns)
        attn.stats = None
    return aux, usage


def _weight(proj: torch.nn.Module) -> torch.Tensor:
    """The [out, in] matrix of a bias-free projection (a low-rank one multiplied out)."""
    return proj.up.weight @ proj.down.weight if isinstance(proj, LowRankLinear) else proj.weight


def _in_features(proj: torch.nn.Module) -> int:
    return proj.down.in_features if isinstance(proj, LowRankLinear) else proj.in_features


def absorbed_pairs(q, memory, rows_per_chapter, tok, chap, bias, scale, sparse: bool):
    """Pair attention on raw bank rows (absorbed formulation). With sparse, the bank's gradient holds
    only the touched chapters' rows: they are gathered, or, when they are more than half the bank
    (a gather would copy most of it), the bank is read in place and its gradient cut to them."""
    bank = memory.view(-1, rows_per_chapter, 1, memory.shape[-1])  # [C, T, 1, d]
    if sparse:
        uniq, inv = torch.unique(chap, return_inverse=True)
        if 2 * len(uniq) <= bank.shape[0]:
            bank, chap = gather_chapters(memory, uniq, rows_per_chapter, True)[:, :, None], inv
        else:
            bank = keep_chapter_rows(memory, uniq, rows_per_chapter).view(bank.shape)
    rows = bank.to(q.dtype)
    return pair_attention(q, rows, rows, tok, chap, bias, scale)


class ChapterMemoryAttention(MemoryCrossAttention):
    """Memory cross-attention over routed chapters (same projections as the dense module)."""

    def __init__(self, dim: int, bank_dim: int, num_heads: int, num_kv_heads: int, cfg: MemoryConfig,
                 dropout: float = 0.0, projection_rank: Optional[int] = None):
        super().__init__(dim, bank_dim, num_heads, num_kv_heads, dropout, projection_rank)
        self.cfg, self.num_chapters, self.chapter_len = cfg, cfg.num_chapters, tokens_per_chapter(cfg)
        self.router = build_router(dim, cfg)
        self.expert = None  # set by megamem.parallel.expert: pair attention on the chapters' owner ranks
        self.stats = None  # (routing, losses, usage) of the last forward, collected by the model

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: Optional["LayerCache"] = None) -> torch.Tensor:
        """cache: this layer's decoding state while generating (routing kept under state["routing"])."""
        B, S, _ = x.shape
        strategy = self.cfg.routing_strategy_train if cache is None else self.cfg.routing_strategy_inference
        if strategy == "token":
            routing = self.router(x.reshape(B * S, -1))
            y = self.token_attention(x.reshape(B * S, -1), memory, routing.chapters, routing.bias)
            y = (y * routing.gate.to(y.dtype)[:, None]).view(B, S, -1)
        elif cache is None:
            routing = self.router(x.mean(1))
            y = self.sequence_attention(x, memory, routing) * routing.gate.to(x.dtype)[:, None, None]
        else:
            routing, y = self._cached_sequence(x, memory, cache, strategy == "rolling")
        if cache is None:
            self.stats = (routing, router_losses(routing, self.cfg), chapter_usage(routing, self.num_chapters))
        return self.dropout(self.o_proj(y))

    # ------------------------------------------------------- sequence routing
    def sequence_attention(self, x: torch.Tensor, memory: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [B, S, D] reads the chapters routing.chapters[b] of its sequence → [B, S, H·hd]."""
        B, S, _ = x.shape
        if self.expert is not None:  # sharded bank: every token is paired with its sequence's chapters
            rep = lambda t: t.repeat_interleave(S, 0)  # noqa: E731
            return self.token_attention(x.reshape(B * S, -1), memory, rep(routing.chapters),
                                        rep(routing.bias)).view(B, S, -1)
        if self.diagnose or not self._sequence_absorbed(S, routing.chapters):  # diagnostics read projected keys
            k, v = self._chapter_kv(memory, routing.chapters)
            return self._attend(x, k, v, routing.bias)
        r, hd = self.num_heads // self.num_kv_heads, self.head_dim
        wk, wv = (_weight(p).view(self.num_kv_heads, hd, -1).repeat_interleave(r, 0) for p in (self.k_proj, self.v_proj))
        q = self.q_proj(x).view(B, S, self.num_heads, hd)
        return absorbed_attention(q, memory, routing.chapters, self.chapter_len, wk, wv, routing.bias,
                                  1 / math.sqrt(hd), self.cfg.sparse_bank_grad)

    def _chapter_kv(self, memory: torch.Tensor, chapters: torch.Tensor):
        """K/V [B, kv_heads, m·T, hd] of each sequence's chapters, each distinct chapter projected once."""
        return projected_kv(memory, chapters, self.chapter_len, self.k_proj, self.v_proj, self.num_kv_heads,
                            self.head_dim, self.cfg.sparse_bank_grad)

    def _sequence_absorbed(self, S: int, chapters: torch.Tensor) -> bool:
        """`sequence_routing_formulation`, or with auto the cheaper of the two by their flop counts."""
        mode = self.cfg.sequence_routing_formulation
        if mode != "auto":
            return mode == "absorbed"
        B, m = chapters.shape
        T, d = self.chapter_len, _in_features(self.k_proj)
        return absorbed_is_cheaper(B, S, self.num_heads, self.head_dim, d, self.num_kv_heads, m * T,
                                   torch.unique(chapters).numel() * T)

    def _attend(self, x, k, v, bias):
        B, S, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, S, H, hd).transpose(1, 2)
        if self.diagnose:  # entropy over the rows of the sequence's chapters (expert shards: not computed)
            self.diag = sequence_entropy(q, k, bias if bias.requires_grad else None, self.chapter_len, 1 / math.sqrt(hd))
        y = attend(q, k, v, bias, self.chapter_len, 1 / math.sqrt(hd))
        return y.transpose(1, 2).reshape(B, S, H * hd)

    def _cached_sequence(self, x, memory, cache: "LayerCache", rolling: bool):
        """generate(): K/V of the chosen chapters are cached per layer and recomputed on re-routing."""
        st = cache.state.setdefault("routing", {"window": x[:, :0], "since": 0, "routes": []})
        window = torch.cat([st["window"], x], 1)[:, -self.cfg.rolling_window:] if rolling else None
        first = "routing" not in st
        if first or (rolling and st["since"] >= self.cfg.rolling_interval):
            st["routing"] = self.router((window if rolling else x).mean(1))
            st["since"] = 0 if first else x.shape[1]  # tokens read with this routing (the prompt not counted)
            st["routes"].append(cache.length)
            if self.expert is None:
                st["kv"] = self._chapter_kv(memory, st["routing"].chapters)
        else:
            st["since"] += x.shape[1]
        if rolling:
            st["window"] = window
        routing = st["routing"]
        if self.expert is not None:
            return routing, self.sequence_attention(x, memory, routing)
        return routing, self._attend(x, *st["kv"], routing.bias.detach())

    # ---------------------------------------------------------- token routing
    def token_attention(self, h: torch.Tensor, memory: torch.Tensor, chapters: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
        """h [N, D] reads chapters [N, m] (bias [N, m]) with one softmax over them → [N, H·hd]."""
        N, m = chapters.shape
        H, hd, T = self.num_heads, self.head_dim, self.chapter_len
        tok = torch.arange(N, device=h.device).repeat_interleave(m)
        chap, pair_bias, scale = chapters.flatten(), bias.flatten(), 1 / math.sqrt(hd)
        q = self.q_proj(h).view(N, H, hd)
        sparse = self.cfg.sparse_bank_grad
        if self.diagnose and self.expert is None:  # entropy over the rows of each token's chapters
            self.diag = token_entropy(self._absorb(q, self.k_proj), memory, chapters, bias, T, scale)
        if self.expert is None and not self._absorbed(N * m, chap):
            uniq, inv = torch.unique(chap, return_inverse=True)
            rows = gather_chapters(memory, uniq, T, sparse)
            k = self.k_proj(rows).view(len(uniq), T, self.num_kv_heads, hd)
            v = self.v_proj(rows).view(len(uniq), T, self.num_kv_heads, hd)
            return routed_attention(q, k, v, inv, pair_bias, scale).reshape(N, H * hd)
        r = H // self.num_kv_heads
        wv = _weight(self.v_proj).view(self.num_kv_heads, hd, -1).repeat_interleave(r, 0)  # [H, hd, d]
        q_abs = self._absorb(q, self.k_proj)
        if self.expert is None:  # the bank read in place: only touched chapters get gradients
            bank = memory.to(q.dtype)
            y = routed_attention(q_abs, bank, bank, chap, pair_bias, scale, rows=T, sparse=sparse)  # [N, H, d]
        else:  # the expert sends pairs to the rank owning their chapter and returns their partials
            out, lse = self.expert(q_abs, memory, T, tok, chap, pair_bias, scale, sparse)
            y = merge_partials(out.view(N, m, H, -1), lse.view(N, m, H))  # [N, H, d]
        return torch.einsum("nhd,hed->nhe", y, wv.to(y.dtype)).reshape(N, H * hd)

    def _absorb(self, q: torch.Tensor, proj: torch.nn.Module) -> torch.Tensor:
        """q [N, H, hd] → q·W_k per head [N, H, d]: logits against raw bank rows."""
        r, hd = self.num_heads // self.num_kv_heads, self.head_dim
        wk = _weight(proj).view(self.num_kv_heads, hd, -1).repeat_interleave(r, 0)  # [H, hd, d]
        return torch.einsum("nhe,hed->nhd", q, wk.to(q.dtype))

    def _absorbed(self, pairs: int, chap: torch.Tensor) -> bool:
        """Absorbed (4·P·H·T·d flops) or projected (4·U·T·d·kv·hd + 4·P·H·T·hd) — whichever is cheaper."""
        mode = self.cfg.token_routing_formulation
        if mode != "auto":
            return mode == "absorbed"
        H, hd, T = self.num_heads, self.head_dim, self.chapter_len
        d = _in_features(self.k_proj)
        touched = torch.unique(chap).numel()
        return pairs * H * T * d < touched * T * d * self.num_kv_heads * hd + pairs * H * T * hd
