"""Achieved FLOP/s: memory models over the vanilla model, and any model over the measured matmul peak (MFU).

FLOPs come from megamem.train.metrics.flops_per_token, which counts the memory-attention matmuls
(QKᵀ and PV over N_m rows) and the once-per-forward bank K/V projections, so a ratio near 1 means
the extra work runs as efficiently as the rest — not just that there is more of it.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from megamem.ops import linear
from megamem.train.metrics import flops_per_token

from .models import DTYPES, build, megamem_config, random_ids, train_step
from .timing import alternate


def step_flops(model, batch: int, seq: int) -> float:
    return flops_per_token(model, seq, batch) * batch * seq


def memory_efficiency(size: Dict[str, int], banks: List[int], iters: int, warmup: int,
                      dtypes: List[str] = ("fp32",)) -> Dict:
    """Every model has a dense bank in every layer; all of them and the vanilla model alternate (per dtype)."""
    rows = []
    for dtype in dtypes:
        dt = DTYPES[dtype]
        models = {"vanilla": build(megamem_config(size), dt)}
        models.update({f"memory_{n}": build(megamem_config(size, n), dt) for n in banks})
        batch = size.get("batch_memory", size["batch"])
        ids = random_ids(size["vocab"], batch, size["seq"])
        res = alternate({name: train_step(m, ids) for name, m in models.items()}, iters, warmup)
        flops = {name: step_flops(m, batch, size["seq"]) for name, m in models.items()}
        rate = {name: flops[name] / res[name]["median_s"] for name in models}
        rows += [{"dtype": dtype, "memory_tokens": n, "batch": batch, "step_gflop": flops[f"memory_{n}"] / 1e9,
                  "vanilla_step_gflop": flops["vanilla"] / 1e9, "gflops": rate[f"memory_{n}"] / 1e9,
                  "vanilla_gflops": rate["vanilla"] / 1e9, "step_s": res[f"memory_{n}"]["median_s"],
                  "vanilla_step_s": res["vanilla"]["median_s"], "ratio": rate[f"memory_{n}"] / rate["vanilla"],
                  "target": 0.9} for n in banks]
        del models
    for r in rows:
        r["met"] = r["ratio"] >= r["target"]
    return {"rows": rows}


def peak_matmul(dtype: torch.dtype, n: int, device: str):
    """The MFU denominator: an n×n×n GEMM in `dtype`, through nn.functional.linear as the model's layers
    run it (so a CPU without native bf16 GEMMs is measured on the path the model uses there)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: linear(a, b)), 2 * n ** 3


def mfu(size: Dict[str, int], dtypes: List[str], iters: int, warmup: int, memory_tokens: int = 0,
        device: str = "cpu", peak_n: int = 1024) -> Dict:
    """Achieved FLOP/s of training steps over the matmul peak, both timed alternately here."""
    rows = []
    for name in dtypes:
        dt = DTYPES[name]
        cfg = megamem_config(size, memory_tokens or None)
        model = build(cfg, dt).to(device)
        batch = size.get("batch_" + name, size["batch"])
        ids = random_ids(size["vocab"], batch, size["seq"]).to(device)
        peak_fn, peak_flops = peak_matmul(dt, peak_n, device)
        res = alternate({"step": train_step(model, ids), "peak": peak_fn}, iters, warmup)
        achieved = step_flops(model, batch, size["seq"]) / res["step"]["median_s"]
        peak = peak_flops / res["peak"]["median_s"]
        rows.append({"dtype": name, "device": device, "memory_tokens": memory_tokens, "batch": batch,
                     "achieved_gflops": achieved / 1e9, "peak_gflops": peak / 1e9, "mfu": achieved / peak})
    return {"rows": rows}
