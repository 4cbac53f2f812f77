"""Memory ablations for evaluation: what the memory really contributes, measured by switching it off.

    with ablated(model, off_layers=[3]):   # layer 3's memory branch adds nothing (its output removed)
    with ablated(model, mean_banks=True):  # every bank reads as its mean row repeated N times

Forward hooks on the branch and bank objects, removed on exit; the model and its config are untouched.
`ablate_memory` runs the perplexity evaluation under each setting: on, each layer off, all off, mean bank.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional

import torch
import torch.nn as nn

from ..config import ConfigError
from ..model.diagnostics import memory_branches


def _zero_output(module, args, output):
    return torch.zeros_like(output)


def _mean_row(module, args, output):
    return output.mean(0, keepdim=True).expand_as(output)


@contextmanager
def ablated(model: nn.Module, off_layers: Iterable[int] = (), mean_banks: bool = False) -> Iterator[None]:
    """off_layers: memory layers whose branch output is removed; mean_banks: each bank replaced by its mean row."""
    branches = dict(memory_branches(model))
    off = list(off_layers)
    unknown = [i for i in off if i not in branches]
    if unknown:
        raise ConfigError(f"layers {unknown} read no memory (memory layers: {sorted(branches)})")
    handles = [branches[i].register_forward_hook(_zero_output) for i in off]
    if mean_banks:
        handles += [bank.register_forward_hook(_mean_row) for bank in getattr(model, "banks", [])]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ablation_settings(model: nn.Module) -> List[Dict[str, object]]:
    """[{name, off_layers, mean_banks}]: on, each memory layer off, all off, mean bank."""
    layers = [i for i, _ in memory_branches(model)]
    return ([{"name": "on", "off_layers": [], "mean_banks": False}]
            + [{"name": f"layer {i} off", "off_layers": [i], "mean_banks": False} for i in layers]
            + [{"name": "all off", "off_layers": layers, "mean_banks": False},
               {"name": "mean bank", "off_layers": [], "mean_banks": True}])


def check_has_memory(model: Optional[nn.Module]) -> nn.Module:
    if model is None or not memory_branches(model):
        raise ConfigError("--ablate-memory: this model has no memory layers (a vanilla model); nothing to ablate")
    return model


def ablate_memory(loaded, cfg, split: str = "eval", max_batches: Optional[int] = None) -> List[Dict[str, object]]:
    """Eval loss and perplexity under every setting of ablation_settings, on the same batches."""
    from .perplexity import perplexity

    model = check_has_memory(loaded.megamem)
    rows = []
    for setting in ablation_settings(model):
        with ablated(model, setting["off_layers"], setting["mean_banks"]):
            result = perplexity(loaded, cfg, split, max_batches)
        rows.append({**setting, "loss": result["loss"], "ppl": result["ppl"], "tokens": result["tokens"]})
    on = rows[0]["loss"]
    for row in rows:
        row["delta_loss"] = row["loss"] - on
    return rows


def ablation_table(rows: List[Dict[str, object]]) -> str:
    lines = [f"{'memory':<16}{'loss':>10}{'perplexity':>14}{'Δ loss vs on':>15}"]
    for r in rows:
        lines.append(f"{r['name']:<16}{r['loss']:>10.4f}{r['ppl']:>14.2f}{r['delta_loss']:>+15.4f}")
    return "\n".join(lines)
