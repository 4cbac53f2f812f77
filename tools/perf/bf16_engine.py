"""bf16 training as megamem runs it — DeepSpeed's bf16 engine (bf16 weights and activations, fp32 master
weights and AdamW state, the update applied in fp32) — against a model cast to bf16 with a bf16 AdamW (the
`vanilla` row's megamem) and transformers' Llama cast the same way, all vanilla, same weights, one process
(a spawned one-rank gloo group for DeepSpeed, on every core the caller may use), alternating.

What the engine adds over the cast model: the fp32 master copy (4 more bytes a parameter, 8 for Adam's state in
fp32 instead of bf16), gradients handed to an fp32 optimizer, and the bf16 copy refreshed after each step.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Dict, List

import torch

from .distributed import TESTS, _ds, _engine_step
from .models import build, hf_twin, megamem_config, random_ids, train_step
from .timing import alternate, speedup


def _engine(cfg, batch: int, stage: int):
    import deepspeed

    ds = dict(_ds(stage, batch), train_batch_size=batch, bf16={"enabled": True})  # one rank
    model = build(cfg, torch.float32)  # the engine casts it to bf16 and keeps the fp32 master weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)[0]


def _worker(size: Dict[str, int], stages: List[int], iters: int, warmup: int, cores: List[int], threads: int) -> Dict:
    os.sched_setaffinity(0, cores)  # the rank was pinned to one core; the benchmark uses the caller's threads
    torch.set_num_threads(threads)
    batch = size.get("batch_bf16", size["batch"])
    cfg = megamem_config(size)
    cast = build(cfg, torch.bfloat16)
    ids = random_ids(size["vocab"], batch, size["seq"])
    steps = {"cast": train_step(cast, ids), "transformers": train_step(hf_twin(cast, cfg, torch.bfloat16), ids, hf=True)}
    for stage in stages:
        steps[f"engine_zero{stage}"] = _engine_step(_engine(cfg, batch, stage), ids)
    res = alternate(steps, iters, warmup)
    tokens = batch * size["seq"]
    rows = [{"system": name, "batch": batch, "seq": size["seq"], "tokens_per_s": tokens / res[name]["median_s"],
             "vs_cast": speedup(res, name, "cast"), "vs_transformers": speedup(res, name, "transformers")}
            for name in steps]
    return {"rows": rows}


def run(size: Dict[str, int], stages: List[int], iters: int, warmup: int) -> Dict:
    sys.path.insert(0, TESTS)
    from dist_utils import run_ranks

    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        return run_ranks(_worker, size, stages, iters, warmup, cores, torch.get_num_threads(), world_size=1,
                         tmp_path=tmp, timeout=3600)[0]
