"""PEER expert usage at evaluation: how evenly retrieval spreads over experts, as numbers and a plot."""
from __future__ import annotations

from typing import Dict, List

import torch

from ..folders import write_figure


def expert_summary(usage: Dict[int, List[float]], threshold: float) -> Dict[int, Dict[str, float]]:
    """Per PEER layer: training's usage record (usage, unevenness, hot experts; megamem.model.mlp.peer.usage_stats)
    plus the largest share of selections one expert took."""
    from ..model.mlp.peer import usage_stats

    out = {}
    for layer, counts in usage.items():
        c = torch.tensor(counts, dtype=torch.float64)
        out[layer] = {**usage_stats(c, threshold), "max_share": (c.max() / c.sum()).item() if c.sum() > 0 else 0.0}
    return out


def plot_expert_usage(usage: Dict[int, List[float]], path: str) -> str:
    """Share of selections per expert, experts sorted by it (log-log; dashed: uniform), one line per PEER layer.
    Sorted, not by id: a table of a million experts has no readable bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    n = 1
    for layer in sorted(usage):
        c = torch.tensor(usage[layer], dtype=torch.float64)
        n = max(n, c.numel())
        share = (c / c.sum().clamp(min=1)).sort(descending=True).values
        ax.plot(torch.arange(1, c.numel() + 1).numpy(), share.clamp(min=1e-12).numpy(), label=f"layer {layer}")
    ax.axhline(1 / n, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="expert rank (most chosen first)", ylabel="share of selections",
           title="PEER expert usage (dashed: uniform)")
    ax.legend()
    fig.tight_layout()
    return write_figure(fig, path, dpi=100)
