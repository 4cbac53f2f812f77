"""PEER: parameter-efficient expert retrieval (He 2024, arXiv 2407.04153) in place of a block's MLP.

Per head h a query q = norm(W_q x) is split into D sub-queries; sub-key set i holds
product_key_dim[i] keys. An expert is a tuple (i_0, …, i_{D-1}) of sub-keys, its score the sum of
the sub-scores, its id the mixed-radix number i_0·(n_1⋯n_{D-1}) + … + i_{D-1} (a bijection onto
0..N-1). `product_topk` finds the exact top-k of all N scores from D small top-k's. The chosen
experts are small MLPs (expert_hidden_size neurons): out = Σ_h Σ_k softmax(s)_k · V[e_k]ᵀ gelu(U[e_k] x).

Tables U, V are plain parameters of shape [N·expert_hidden_size, hidden] read by row (under ZeRO-3
they are partitioned like any parameter and gathered whole for this module's forward). U's rows are
gathered once ([tokens, h·k·he, hidden]); V is read through embedding_bag with the gated activations
as per-sample weights, so its rows are never materialised per token. With `sparse_tables` both reads
return row-sparse COO gradients holding only the chosen rows (megamem.memory.sparse_rows.gather_rows);
training then updates them with the lazy RowSparseAdamW outside the engine (megamem.train.peer_tables).

BatchNorm on the query (batch_norm_query, as in the paper) normalises over every token of the batch
in training mode, so a token's output then depends on the other tokens' queries; in eval mode it uses
running statistics and each token is computed alone (causal, and decoding equals the full forward).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ModelConfig
from ...memory.sparse_rows import gather_rows
from ...ops import Linear
from .registry import MLP


def product_topk(sub_scores: Sequence[torch.Tensor], k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the Cartesian product of D sub-key sets, scores added, ids in mixed radix.

    sub_scores[i]: [..., n_i]. Iterative: the top-k of sets 0..i is among (top-k of sets 0..i-1) ×
    (top-k of set i), since any other pair is beaten by k pairs sharing one of its parts. Returns
    (scores [..., k], expert ids [..., k]), scores descending.
    """
    scores, ids = sub_scores[0].topk(min(k, sub_scores[0].shape[-1]), dim=-1)
    for sub in sub_scores[1:]:
        n = sub.shape[-1]
        s, i = sub.topk(min(k, n), dim=-1)
        cand = (scores.unsqueeze(-1) + s.unsqueeze(-2)).flatten(-2)
        cand_ids = (ids.unsqueeze(-1) * n + i.unsqueeze(-2)).flatten(-2)
        scores, pos = cand.topk(min(k, cand.shape[-1]), dim=-1)
        ids = cand_ids.gather(-1, pos)
    return scores, ids


def expert_id(indices: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """Mixed-radix id of sub-key indices (i_0, …, i_{D-1}): i_0·n_1⋯n_{D-1} + … + i_{D-1}."""
    out = torch.zeros_like(indices[0])
    for i, n in zip(indices, sizes):
        out = out * n + i
    return out


@MLP.register("peer")
class PEER(nn.Module):
    def __init__(self, model: ModelConfig, layer_idx: int = 0):
        super().__init__()
        p = model.peer_config
        self.layer_idx, self.hidden = layer_idx, model.hidden_dim
        self.sizes: List[int] = list(p.product_key_dim)
        self.heads, self.k, self.query_dim = p.num_heads, p.num_experts_per_tok, p.query_dim
        self.num_experts, self.expert_hidden = p.num_experts, p.expert_hidden_size
        self.sub_dim = p.query_dim // len(self.sizes)
        self.std = model.initializer_range
        self.query = Linear(model.hidden_dim, self.heads * self.query_dim, bias=False)
        self.batch_norm = p.batch_norm_query
        self.query_norm = nn.BatchNorm1d(self.heads * self.query_dim) if p.batch_norm_query \
            else nn.LayerNorm(self.query_dim)
        for i, n in enumerate(self.sizes):  # own parameters, so ZeRO-3 gathers them for this forward
            self.register_parameter(f"sub_keys_{i}", nn.Parameter(torch.empty(n, self.sub_dim)))
        rows = self.num_experts * self.expert_hidden
        self.expert_down = nn.Parameter(torch.empty(rows, model.hidden_dim))  # U: row e·he + j = neuron j of e
        self.expert_up = nn.Parameter(torch.empty(rows, model.hidden_dim))  # V
        self.dropout = nn.Dropout(model.dropout)
        self.log_usage = p.log_expert_usage
        self.sparse_tables = p.sparse_tables  # tables get row-sparse gradients (the chosen rows only)
        self.register_buffer("expert_counts", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def sub_keys(self) -> List[torch.Tensor]:
        return [getattr(self, f"sub_keys_{i}") for i in range(len(self.sizes))]

    def reset_parameters(self) -> None:
        """This module's own parameters (children init themselves): keys give O(1) scores, tables the model's std."""
        for key in self.sub_keys():
            nn.init.normal_(key, std=self.sub_dim ** -0.5)
        nn.init.normal_(self.expert_down, std=self.std)
        nn.init.normal_(self.expert_up, std=self.std)

    def no_weight_decay_parameters(self) -> List[nn.Parameter]:
        """Expert tables: decay would shrink every row each step although a step reads few of them."""
        return [self.expert_down, self.expert_up]

    def active_flops_per_token(self) -> Tuple[List[nn.Parameter], float]:
        """(parameters not to count as dense weights, training FLOPs per token of what a token really uses)."""
        scoring = self.heads * sum(self.sizes) * self.sub_dim
        experts = 2 * self.heads * self.k * self.expert_hidden * self.hidden
        return self.sub_keys() + [self.expert_down, self.expert_up], 6.0 * (scoring + experts)

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] → (scores [T, heads, k], expert ids [T, heads, k])."""
        q = self.query(x)
        if self.batch_norm:
            q = self.query_norm(q).view(-1, self.heads, self.query_dim)
        else:
            q = self.query_norm(q.view(-1, self.heads, self.query_dim))
        q = q.view(q.shape[0], self.heads, len(self.sizes), self.sub_dim)
        subs = [torch.einsum("thc,nc->thn", q[:, :, i], key.to(q.dtype)) for i, key in enumerate(self.sub_keys())]
        return product_topk(subs, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores, ids = self.route(flat)
        if self.log_usage:
            with torch.no_grad():
                self.expert_counts.copy_(torch.bincount(ids.flatten(), minlength=self.num_experts))
        gates = scores.softmax(dim=-1)  # [T, h, k]
        he = self.expert_hidden
        rows = (ids.unsqueeze(-1) * he + torch.arange(he, device=ids.device)).flatten(1)  # [T, h·k·he]
        sparse = self.sparse_tables and torch.is_grad_enabled()
        down = gather_rows(self.expert_down.to(flat.dtype), rows, sparse)  # [T, h·k·he, hidden]
        act = F.gelu(torch.einsum("td,tmd->tm", flat, down))
        weights = act * gates.repeat_interleave(he, dim=-1).flatten(1).to(act.dtype)
        up = self.expert_up.to(flat.dtype)  # per-sample weights at the table's dtype (under autocast they are not)
        out = F.embedding_bag(rows, up, per_sample_weights=weights.to(up.dtype), mode="sum", sparse=sparse)
        return self.dropout(out.view(shape))


def usage_stats(counts: torch.Tensor, threshold: float) -> Dict[str, float]:
    """usage: fraction of experts chosen at least once; unevenness: KL(counts/total ‖ uniform) =
    log N + Σ z log z (0 when every expert is chosen equally); hot: experts chosen more than threshold ×
    the mean count (and their fraction of N)."""
    counts = counts.double()
    n, total = counts.numel(), counts.sum()
    z = counts / total if total > 0 else counts
    nz = z[z > 0]
    return {"usage": (counts > 0).double().mean().item(),
            "unevenness": (math.log(n) + (nz * nz.log()).sum()).item() if total > 0 else 0.0,
            "hot_experts": int((counts > threshold * counts.mean()).sum().item()),
            "hot_fraction": (counts > threshold * counts.mean()).double().mean().item()}


def peer_modules(model: nn.Module) -> Dict[int, PEER]:
    """PEER layers of a model (or pipeline stage), by layer index."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, PEER)}
