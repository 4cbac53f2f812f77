#!/usr/bin/env python
"""Step time and peak memory of chapter routing as the bank grows (not a test).

    python tools/bench_chapters.py            # small model, 16k → 128k → 1M memory tokens, a few minutes
    python tools/bench_chapters.py --full     # B=8, S=256, d=512, 8 heads, k=8, 256 tokens per chapter

One memory layer, k·tokens_per_chapter fixed, forward + backward + fused AdamW step, fp32. Each
(mode, bank size) runs in its own process so its peak RSS is its own. Prints a table with the
ratio of each step time to the same mode's smallest bank, and writes a PNG plot. Step time is the
CPU time of the single compute thread (best of `steps` steps after a warm-up step): on a shared
machine it measures the step's work, not the other processes' load; wall time is printed too.
Each process runs with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for large
allocations): without it, first-touch page faults of fresh multi-MB buffers cost about half of a
1M-token step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# sparse: row-sparse bank gradient + RowSparseAdamW on the bank (only read chapters are updated)
SMALL = dict(batch=4, seq=128, dim=128, heads=4, k=8, chapter=64, vocab=512, steps=3)
FULL = dict(batch=8, seq=256, dim=512, heads=8, k=8, chapter=256, vocab=512, steps=3)
BANKS = [16_384, 131_072, 1_048_576]
MODES = ["dense", "sequence", "sequence-sparse", "token", "token-sparse", "token-absorbed"]


def build_case(mode: str, bank: int, p: dict):
    """(model, optimizers) for one (mode, bank size): one memory layer, k·tokens_per_chapter fixed."""
    import torch

    from megamem.config import load_config
    from megamem.train.sparse_adamw import RowSparseAdamW
    from megamem.model import build_model

    torch.manual_seed(0)
    over = {"model.hidden_dim": p["dim"], "model.num_heads": p["heads"], "model.num_layers": 2,
            "model.intermediate_dim": 4 * p["dim"], "model.vocab_size": p["vocab"], "model.max_seq_len": p["seq"],
            "training.max_length": p["seq"], "memory.num_memory_tokens": bank,
            "memory.memory_layer_placement": "last_k", "memory.memory_layer_k": 1, "memory.wo_init_zero": False}
    if mode != "dense":
        over.update({"memory.use_chapters": True, "memory.num_chapters": bank // p["chapter"],
                     "memory.top_k_chapters": p["k"], "memory.routing_strategy_train": mode.split("-")[0],
                     "memory.token_routing_formulation": "absorbed" if mode.endswith("absorbed") else "auto",
                     "memory.sparse_bank_grad": mode.endswith("sparse")})
    cfg = load_config(None, [f"--{k}={json.dumps(v)}" for k, v in over.items()])
    model = build_model(cfg)
    rows = list(model.banks.parameters()) if mode.endswith("sparse") else []
    rest = [p for p in model.parameters() if all(p is not b for b in rows)]
    opts = [torch.optim.AdamW(rest, lr=1e-4, fused=True)] + ([RowSparseAdamW(rows, lr=1e-4, block_rows=p["chapter"])] if rows else [])
    return model, opts


def train_step(model, opts, ids):
    """Forward + backward (LM and router losses) + optimizer steps; returns the model output."""
    out = model(ids, labels=ids)
    (out.loss + sum(out.aux_losses.values())).backward()
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def run_one(mode: str, bank: int, p: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # one compute thread: its CPU time is the step's cost, whatever else runs
    model, opts = build_case(mode, bank, p)
    gen = torch.Generator().manual_seed(0)
    times, walls = [], []
    for step in range(p["steps"] + 1):
        ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=gen)
        start, wall = time.process_time(), time.perf_counter()
        out = train_step(model, opts, ids)
        if step:  # the first step warms up allocations and kernels
            times.append(time.process_time() - start)
            walls.append(time.perf_counter() - wall)
    usage = next(iter(out.chapter_usage.values()), None)
    return {"mode": mode, "bank": bank, "step_s": min(times), "wall_s": min(walls),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "touched": int((usage > 0).sum()) if usage is not None else None}


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        pts = [r for r in rows if r["mode"] == mode]
        if pts:
            axes[0].plot([r["bank"] for r in pts], [r["step_s"] for r in pts], "o-", label=mode)
            axes[1].plot([r["bank"] for r in pts], [r["peak_mb"] / 1024 for r in pts], "o-", label=mode)
    for ax, label in zip(axes, ["step CPU time (s): fwd + bwd + AdamW", "peak RSS (GB)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the target sizes (slow on CPU)")
    ap.add_argument("--banks", type=int, nargs="*", default=BANKS)
    ap.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    ap.add_argument("--dense-max", type=int, default=131_072, help="skip dense memory above this bank size")
    ap.add_argument("--out", default="bench_chapters.png")
    ap.add_argument("--no-hugepages", action="store_true",
                    help="do not set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (large buffers then page-fault 512x more)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one (mode, bank) and print JSON
    args = ap.parse_args()
    p = FULL if args.full else SMALL
    if args.one:
        mode, bank = args.one.split(":")
        print(json.dumps(run_one(mode, int(bank), p)))
        return 0
    rows = []
    for mode in args.modes:
        for bank in args.banks:
            if mode == "dense" and bank > args.dense_max:
                continue
            cmd = [sys.executable, __file__, f"--one={mode}:{bank}"] + (["--full"] if args.full else [])
            env = dict(os.environ) if args.no_hugepages else {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                print(f"{mode} {bank}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {mode:15s} {bank:>9,d}  {rows[-1]['step_s']:.3f} s", file=sys.stderr, flush=True)
    desc = (f"B={p['batch']} S={p['seq']} d={p['dim']} heads={p['heads']} k={p['k']} "
            f"tokens/chapter={p['chapter']} (k·T={p['k'] * p['chapter']}), fp32, 1 thread"
            + ("" if args.no_hugepages else ", malloc hugetlb=1"))
    print(f"# {desc}\n")
    print("| mode | memory tokens | chapters touched | step CPU (s) | × smallest bank | wall (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["mode"] == r["mode"])
        touched = "—" if r["touched"] is None else f"{r['touched']:,}"
        print(f"| {r['mode']} | {r['bank']:,} | {touched} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} "
              f"| {r['wall_s']:.3f} | {r['peak_mb'] / 1024:.2f} |")
    plot(rows, args.out, desc)
    print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
