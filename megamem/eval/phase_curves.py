"""A progressive run seen whole: per-phase results and one loss curve over tokens with the phase boundaries.

Each phase is its own run (its own metrics.jsonl counting steps from 0), so its curve alone hides how the
schedule went; this joins them on one token axis. Tokens of a record = its step × the phase's tokens per
step, read back from the record itself (tokens_per_s × step_time_s), so any batch size, accumulation or
number of ranks is counted right.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from ..config import MegamemConfig
from ..folders import write_figure
from ..train.progressive import block_size, phase_dir, total_blocks


def _records(folder: str) -> List[Dict[str, Any]]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_summary(folder: str, offset: int = 0) -> Optional[Dict[str, Any]]:
    """One run's (or phase's) steps, tokens, last losses, summed step time and its curves as (tokens since
    `offset`, loss) points; None when it has logged no training step."""
    records = _records(folder)
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
    # a resumed run logs the steps after its checkpoint again: the last record of a step wins
    by_step = {r["step"]: r for r in train}
    train = [by_step[s] for s in sorted(by_step)]
    per_step = round(train[-1]["tokens_per_s"] * train[-1]["step_time_s"])  # an integer, up to rounding
    evals = {r["step"]: r for r in records if r.get("kind") == "eval"}
    steps = train[-1]["step"]
    last = evals[max(evals)] if evals else None
    return {
        "start_tokens": offset, "steps": steps, "tokens": steps * per_step,
        "train_loss": train[-1]["loss"], "eval_loss": last["eval_loss"] if last else None,
        "eval_ppl": last["eval_ppl"] if last else None, "eval_step": last["step"] if last else None,
        "train_time_s": sum(r["step_time_s"] for r in train),
        "train_curve": [(offset + r["step"] * per_step, r["loss"]) for r in train],
        "eval_curve": [(offset + s * per_step, evals[s]["eval_loss"]) for s in sorted(evals)],
    }


def phase_summaries(cfg: MegamemConfig) -> List[Dict[str, Any]]:
    """One entry per phase that has metrics (run_summary plus its phase and layers), on one token axis."""
    out, offset = [], 0
    size = block_size(cfg.training)
    for p in range(total_blocks(cfg)):
        s = run_summary(phase_dir(cfg, p), offset)
        if s is None:
            continue
        out.append({"phase": p, "layers": [p * size, (p + 1) * size - 1], **s})
        offset = s["start_tokens"] + s["tokens"]
    return out


def format_table(summaries: List[Dict[str, Any]]) -> str:
    lines = [f"{'phase':>5} {'layers':>8} {'steps':>6} {'tokens':>10} {'train loss':>10} {'eval loss':>9} "
             f"{'step time s':>11}"]
    for s in summaries:
        ev = "-" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
        lines.append(f"{s['phase']:>5} {s['layers'][0]:>4}-{s['layers'][1]:<3} {s['steps']:>6} {s['tokens']:>10,} "
                     f"{s['train_loss']:>10.4f} {ev:>9} {s['train_time_s']:>11.1f}")
    return "\n".join(lines)


def plot_phases(summaries: List[Dict[str, Any]], path: str, title: str = "") -> None:
    """Train (line) and eval (dots) loss over tokens, a dashed line where each phase after the first begins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    start = 0.0
    for i, s in enumerate(summaries):
        xs, ys = zip(*s["train_curve"])
        ax.plot(xs, ys, color="C0", lw=1.2, label="train loss" if i == 0 else None)
        if s["eval_curve"]:
            ex, ey = zip(*s["eval_curve"])
            ax.plot(ex, ey, "o", color="C1", ms=4, label="eval loss" if i == 0 else None)
        if i > 0:
            ax.axvline(start, color="grey", ls="--", lw=0.8)
        ax.annotate(f"phase {s['phase']}", (start, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="grey")
        start = s["start_tokens"] + s["tokens"]
    ax.set_xlim(left=0)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(title or "progressive training: loss by phase")
    ax.legend()
    fig.tight_layout()
    write_figure(fig, path)


def plot_arms(arms: Dict[str, List[Dict[str, Any]]], path: str, title: str = "") -> None:
    """Several runs on one token axis, each in its colour: train loss (line), eval loss (dots joined), and a
    dashed line where each of its phases after the first begins. arms: name → its run_summary/phase_summaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    styles = ["--", ":", "-."]
    for i, (name, summaries) in enumerate(arms.items()):
        color = f"C{i}"
        train = [pt for s in summaries for pt in s["train_curve"]]
        evals = [pt for s in summaries for pt in s["eval_curve"]]
        ax.plot(*zip(*train), color=color, lw=1.0, alpha=0.45, label=f"{name}: train")
        if evals:
            ax.plot(*zip(*evals), "o-", color=color, ms=4, lw=1.2, label=f"{name}: eval")
        for j, s in enumerate(summaries[1:]):
            ax.axvline(s["start_tokens"], color=color, ls=styles[i % len(styles)], lw=0.9,
                       label=f"{name}: phase starts" if j == 0 else None)
    ax.set_xlim(left=0)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss over tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(fig, path)
