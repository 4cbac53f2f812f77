#!/usr/bin/env python
"""Training-step (and decoding) time of this checkout against another git revision, side by side in one run.

    python tools/compare_revisions.py --baseline main              # vanilla, dense memory, chapters, generate
    python tools/compare_revisions.py --baseline HEAD~3 --rounds 7 --cases vanilla

The baseline is checked out into a temporary git worktree. Each round runs one fresh process per side
(alternating A B B A ...), each timing `--steps` forward+backward+AdamW steps after a warm-up, with the
same thread count; the tool prints each side's median and the ratio baseline / this. Same seed, same
model and batch on both sides, so a refactor that changes no computation should read ≈ 1.00.
Not a test: timings on a shared machine vary by a few percent between rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {  # overrides on top of the size below; "generate" cases time decoding instead of a training step
    "vanilla": ["memory.vanilla_mode=true"],
    "generate": ["memory.num_memory_tokens=4096", "memory.memory_layer_placement=all"],
    "memory": ["memory.num_memory_tokens=4096", "memory.memory_layer_placement=all", "memory.wo_init_zero=false"],
    "chapters": ["memory.num_memory_tokens=16384", "memory.use_chapters=true", "memory.num_chapters=64",
                 "memory.top_k_chapters=8", "memory.wo_init_zero=false"],
}
SIZE = ["model.vocab_size=8192", "model.hidden_dim=256", "model.intermediate_dim=688", "model.num_layers=4",
        "model.num_heads=8", "model.num_kv_heads=4", "model.max_seq_len=128", "training.max_length=128",
        "model.dropout=0.0", "model.attention_dropout=0.0"]

# runs inside the revision's checkout (its own megamem), prints one JSON line
WORKER = r"""
import json, sys, time, statistics, torch
sys.path.insert(0, sys.argv[1])
from megamem.config import load_config
from megamem.model import build_model
overrides, steps, batch, threads = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
generate = sys.argv[6] == "generate"
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = load_config(None, ["--" + o for o in overrides])
model = build_model(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.training.max_length), generator=torch.Generator().manual_seed(0))
if generate:
    model.eval()
def step():
    if generate:  # 64 new tokens after a 32-token prompt, greedy, on the KV cache
        with torch.no_grad():
            return model.generate(ids[:, :32], 64).shape
    out = model(ids, labels=ids)
    (out.loss + sum(out.aux_losses.values())).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()
step()
times = []
for _ in range(steps):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"median_s": statistics.median(times)}))
"""


def worktree(rev: str) -> str:
    path = tempfile.mkdtemp(prefix="megamem-baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "--force", path, rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return path


def run_side(src: str, overrides, args, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", WORKER, src, json.dumps(overrides), str(args.steps), str(args.batch),
                          str(args.threads), mode], capture_output=True, text=True, cwd=src)
    if out.returncode != 0:
        raise SystemExit(f"error: a timing run in {src} failed:\n{out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare against (e.g. main, HEAD~1)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--rounds", type=int, default=5, help="processes per side and case (alternating)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (median taken)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    base = worktree(args.baseline)
    try:
        print(f"{'case':10s} {'baseline ms':>12s} {'this ms':>10s} {'baseline/this':>14s}")
        for case in args.cases:
            overrides = SIZE + CASES[case]
            times = {"base": [], "this": []}
            for r in range(args.rounds):
                order = ("base", "this") if r % 2 == 0 else ("this", "base")
                for side in order:
                    times[side].append(run_side(base if side == "base" else ROOT, overrides, args,
                                                "generate" if case == "generate" else "train"))
            b, t = statistics.median(times["base"]), statistics.median(times["this"])
            print(f"{case:10s} {b * 1e3:12.1f} {t * 1e3:10.1f} {b / t:14.3f}", flush=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
