"""Chapter scaling: step time as the bank grows with k·tokens_per_chapter fixed, and routed vs dense.

Builds on tools/bench_chapters.py (its model recipe and train step); here every bank size of a mode
is built in this process and the steps alternate, so each ratio is measured side by side.
"""
from __future__ import annotations

from typing import Dict, List

import torch

import bench_chapters

from .timing import alternate


def run(p: dict, banks: List[int], modes: List[str], iters: int, warmup: int) -> Dict:
    ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=torch.Generator().manual_seed(0))
    rows = []
    for mode in modes:
        cases = {bank: bench_chapters.build_case(mode, bank, p) for bank in banks}
        cases["dense"] = bench_chapters.build_case("dense", banks[0], p)
        res = alternate({str(b): (lambda c=c: bench_chapters.train_step(c[0], c[1], ids)) for b, c in cases.items()},
                        iters, warmup)
        del cases
        base = res[str(banks[0])]["median_s"]
        for bank in banks:
            t = res[str(bank)]["median_s"]
            rows.append({"mode": mode, "memory_tokens": bank, "step_s": t, "vs_smallest_bank": t / base,
                         "vs_dense_smallest_bank": t / res["dense"]["median_s"]})
        rows[-1].update(target=1.2, met=rows[-1]["vs_smallest_bank"] <= 1.2)
    return {"rows": rows, "shape": p}
