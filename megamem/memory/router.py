"""Chapter router: fp32 scores, top-k choice, the straight-through gate, and the router losses.

Gradient mechanism (why the router learns although top-k is discrete): every chosen chapter's
logits get the bias b = log p_c − stopgrad(log p_c), where p is the softmax over ALL routed
chapters (not renormalised over the top-k: that gate is 1 at k = 1 and its log has no gradient).
b is 0 in value, so the forward pass is exactly attention over the chosen chapters, while
∂L/∂log p_c = ∂L/∂b_c = (attention mass on c) × (how much c's values help). One softmax is
invariant to a bias shared by all its logits, so a token reading a single chapter (k = 1, no
shared chapters) would get no gradient from b; the output is therefore also multiplied by
g / stopgrad(g), g = Σ_chosen p_c (value 1), which tells the router whether reading memory at
all helped. Scores are computed in fp32 (bf16 flips top-k picks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..config import MemoryConfig
from ..ops import seeded_normal_


@dataclass
class Routing:
    """One routing decision for n units (tokens or sequences)."""

    logits: torch.Tensor  # [n, routed] fp32 router scores
    probs: torch.Tensor  # [n, routed] fp32 softmax over the routed chapters
    chapters: torch.Tensor  # [n, shared + k] global chapter ids (shared chapters first)
    bias: torch.Tensor  # [n, shared + k] fp32 straight-through log-gates (value log routed_scaling_factor or 0)
    gate: torch.Tensor  # [n] fp32, value 1: g / stopgrad(g) multiplies the memory output


class ChapterRouter(nn.Module):
    """Linear hidden → routed-chapter scores (no bias), evaluated in fp32."""

    def __init__(self, hidden_dim: int, num_chapters: int, num_shared: int, top_k: int, scaling: float = 1.0):
        super().__init__()
        self.num_chapters, self.num_shared, self.top_k = num_chapters, num_shared, top_k
        self.scaling = scaling
        self.weight = nn.Parameter(torch.empty(num_chapters - num_shared, hidden_dim))
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        seeded_normal_(self.weight, 0.02, generator)

    def forward(self, h: torch.Tensor) -> Routing:
        """h [n, hidden] (a token's normed hidden state, or a sequence's mean) → Routing."""
        logits = h.float() @ self.weight.float().t()
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        n, s = h.shape[0], self.num_shared
        log_p = top_p.log()
        bias = log_p - log_p.detach() + torch.log(torch.tensor(self.scaling))
        g = top_p.sum(-1)
        shared = torch.arange(s, device=h.device).expand(n, s)
        return Routing(logits, probs, torch.cat([shared, top_i + s], 1),
                       torch.cat([bias.new_zeros(n, s), bias], 1), g / g.detach())


def chapter_usage(routing: Routing, num_chapters: int) -> torch.Tensor:
    """How many units read each chapter ([num_chapters] int64; shared chapters count every unit)."""
    return torch.bincount(routing.chapters.flatten(), minlength=num_chapters)


def router_losses(routing: Routing, cfg: MemoryConfig) -> Dict[str, torch.Tensor]:
    """Enabled router losses, each already multiplied by its coefficient (fp32 scalars).

    load_balance_loss (Switch): R · Σ_c f_c · P_c, f_c = fraction of the n·k picks that went to
    routed chapter c, P_c = mean router probability of c; 1 when uniform.
    auxiliary_loss (importance, Shazeer et al. 2017): CV² of I_c = Σ_units p_c (variance/mean²).
    z_loss: mean over units of logsumexp(logits)².
    """
    out: Dict[str, torch.Tensor] = {}
    probs, R = routing.probs, routing.probs.shape[1]
    if cfg.use_load_balance_loss:
        picks = routing.chapters[:, cfg.num_shared_chapters:] - cfg.num_shared_chapters
        f = torch.bincount(picks.flatten(), minlength=R).float() / picks.numel()
        out["load_balance_loss"] = cfg.load_balance_coefficient * R * (f * probs.mean(0)).sum()
    if cfg.use_auxiliary_loss:
        importance = probs.sum(0)
        out["auxiliary_loss"] = cfg.auxiliary_loss_coefficient * importance.var(unbiased=False) / importance.mean() ** 2
    if cfg.use_z_loss:
        out["z_loss"] = cfg.z_loss_coefficient * torch.logsumexp(routing.logits, -1).pow(2).mean()
    return out
