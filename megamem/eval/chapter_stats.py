"""Chapter usage: how evenly the router spreads reads over chapters, as numbers and a plot."""
from __future__ import annotations

import math
from typing import Dict, List

from ..folders import write_figure


def usage_summary(usage: Dict[int, List[float]]) -> Dict[int, Dict[str, float]]:
    """Per memory layer: share of reads per chapter, normalised entropy (1 = uniform), max share, unused chapters."""
    out = {}
    for layer, counts in usage.items():
        total = sum(counts) or 1.0
        shares = [c / total for c in counts]
        entropy = -sum(p * math.log(p) for p in shares if p > 0)
        out[layer] = {"shares": shares, "normalised_entropy": entropy / math.log(len(shares)) if len(shares) > 1 else 1.0,
                      "max_share": max(shares), "unused": sum(1 for c in counts if c == 0)}
    return out


def plot_usage(usage: Dict[int, List[float]], path: str) -> str:
    """One bar chart per memory layer (share of reads per chapter), saved to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(usage)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.8 * len(layers) + 0.6), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        total = sum(usage[layer]) or 1.0
        ax.bar(range(len(usage[layer])), [c / total for c in usage[layer]])
        ax.axhline(1 / len(usage[layer]), color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(f"layer {layer}")
    axes[-1, 0].set_xlabel("chapter")
    fig.suptitle("share of chapter reads (dashed: uniform)")
    fig.tight_layout()
    return write_figure(fig, path, dpi=100)
