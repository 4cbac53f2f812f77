#!/usr/bin/env python
"""Compare finished runs side by side: final eval loss and perplexity, and a loss-curve plot.

    python tools/compare_runs.py outputs/demo/memory outputs/demo/vanilla --plot outputs/demo/loss_curves.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def read_metrics(run: str):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found (is {run} a training output_dir?)")
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="output_dir of each run")
    p.add_argument("--plot", help="write a PNG of train and eval loss curves here")
    args = p.parse_args(argv)
    rows = []
    for run in args.runs:
        train, evals = read_metrics(run)
        last = evals[-1] if evals else None
        rows.append((os.path.basename(os.path.normpath(run)), train, evals, last))
    print(f"{'run':<16}{'steps':>8}{'train loss':>12}{'eval loss':>12}{'eval ppl':>12}")
    for name, train, _, last in rows:
        ev_loss = f"{last['eval_loss']:.4f}" if last else "-"
        ev_ppl = f"{last['eval_ppl']:.2f}" if last else "-"
        print(f"{name:<16}{train[-1]['step'] if train else 0:>8}{train[-1]['loss'] if train else float('nan'):>12.4f}"
              f"{ev_loss:>12}{ev_ppl:>12}")
    if len(rows) >= 2 and rows[0][3] and rows[1][3]:
        a, b = rows[0][3]["eval_loss"], rows[1][3]["eval_loss"]
        print(f"perplexity ratio {rows[0][0]}/{rows[1][0]}: {math.exp(a - b):.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, train, evals, _) in enumerate(rows):
            color = f"C{i}"
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, alpha=0.5,
                    label=f"{name} train")
            if evals:
                ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=color,
                        label=f"{name} eval")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"loss curves: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
