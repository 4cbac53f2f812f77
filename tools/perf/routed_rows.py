"""A routed step against what its attended rows cost: sequence-routed chapters (each sequence reads
k chapters of T rows) vs a dense bank of k·T rows, same model, fp32 and bf16, side by side.

Every case is built in this process and the steps alternate (perf.timing.alternate), so each ratio
is two medians taken in the same minutes. Routed cases train the bank with row-sparse gradients
and RowSparseAdamW (memory.sparse_bank_grad), as large banks must; the dense reference uses the
fused AdamW on everything. Wide banks use the model's width; `small_dim` adds a 1M-class bank of
a narrower width (memory.memory_dim) against a dense bank of that same width.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megamem.train.sparse_adamw import RowSparseAdamW

from .models import DTYPES, build, megamem_config, random_ids
from .timing import alternate


def build_case(size: Dict, dtype: torch.dtype, bank: int, routed: bool, memory_dim: Optional[int]):
    """(model, optimizers): memory in every layer; routed = sequence-routed chapters of size['chapter'] rows."""
    memory = {} if memory_dim is None else {"memory_dim": memory_dim}
    if routed:
        memory.update(use_chapters=True, num_chapters=bank // size["chapter"], top_k_chapters=size["k"],
                      routing_strategy_train="sequence", sparse_bank_grad=True)
    model = build(megamem_config(size, bank, **memory), dtype)
    banks = list(model.banks.parameters()) if routed else []
    rest = [p for p in model.parameters() if all(p is not b for b in banks)]
    opts = [torch.optim.AdamW(rest, lr=1e-5, fused=True)]
    if banks:
        opts.append(RowSparseAdamW(banks, lr=1e-5, block_rows=size["chapter"]))
    return model, opts


def step_fn(model, opts, ids, touched: List[float]):
    """Forward + backward (LM and router losses) + optimizer steps; records distinct chapters read per layer."""
    model.train()

    def step():
        out = model(ids, labels=ids)
        (out.loss + sum(out.aux_losses.values())).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if out.chapter_usage:
            touched.append(sum(int((u > 0).sum()) for u in out.chapter_usage.values()) / len(out.chapter_usage))
    return step


def run(size: Dict, dtypes: List[str], iters: int, warmup: int) -> Dict:
    """size: the model (perf.models.megamem_config keys, batch), chapter, k, banks (model width) and
    small_dim = {memory_dim, banks}. One row per (dtype, routed bank)."""
    ids = random_ids(size["vocab"], size["batch"], size["seq"])
    attended = size["k"] * size["chapter"]
    groups = [(None, size["banks"])] + ([(size["small_dim"]["memory_dim"], size["small_dim"]["banks"])]
                                         if size.get("small_dim") else [])
    rows = []
    for name in dtypes:
        fns, touched = {}, {}
        for dim in (g[0] for g in groups):
            touched[("dense", dim)] = []
            fns[("dense", dim)] = step_fn(*build_case(size, DTYPES[name], attended, False, dim), ids,
                                          touched[("dense", dim)])
        for dim, banks in groups:
            for bank in banks:
                touched[(bank, dim)] = []
                fns[(bank, dim)] = step_fn(*build_case(size, DTYPES[name], bank, True, dim), ids, touched[(bank, dim)])
        res = alternate({str(k): f for k, f in fns.items()}, iters, warmup)
        del fns
        for dim, banks in groups:
            dense = res[str(("dense", dim))]["median_s"]
            for bank in banks:
                t = res[str((bank, dim))]["median_s"]
                seen = touched[(bank, dim)]
                rows.append({"dtype": name, "memory_tokens": bank, "memory_dim": dim or size["dim"],
                             "chapters": bank // size["chapter"], "attended_rows": attended,
                             "distinct_chapters_per_layer": sum(seen) / len(seen), "picks_per_layer": size["batch"] * size["k"],
                             "step_s": t, "dense_step_s": dense, "vs_dense_attended": t / dense,
                             "target": 1.0, "met": t / dense <= 1.0})
    return {"rows": rows, "shape": {k: v for k, v in size.items() if k != "small_dim"}, "small_dim": size.get("small_dim")}
