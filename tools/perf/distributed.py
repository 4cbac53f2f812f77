"""Two CPU ranks (gloo, one core each): ZeRO-3 scaling and bank-gather cost, expert-parallel all-to-all cost.

All in the same two processes, alternating:
- `zero3` (2 ranks, ZeRO-3, micro-batch b each) vs `one_rank` (rank 0 alone, plain model and AdamW,
  batch 2b): the speed-up of 2 ranks on the same global batch (ideal 2);
- `zero3` vs `zero0` (2 ranks, parameters replicated): what partitioning costs, and the time of one
  all-gather of the bank alone (each step gathers it for forward and again for backward);
- chapters, token routing: ep_size 2 (chapters sharded, pairs sent by all-to-all) vs ep_size 1, forward
  + backward on each rank's half batch.
Times are wall-clock (collectives wait), read on rank 0.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
from typing import Dict

import torch

from .models import megamem_config, random_ids
from .timing import alternate

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests")


def _ds(stage: int, micro: int) -> Dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "train_batch_size": 2 * micro,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def _engine(cfg, stage: int, micro: int):
    import deepspeed

    from megamem.parallel.zero import build_model_for_zero

    ds = _ds(stage, micro)
    model = build_model_for_zero(cfg, ds, stage, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    return engine, model


def _engine_step(engine, ids):
    def step():
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    return step


def _zero_worker(size: Dict, iters: int, warmup: int) -> Dict:
    import deepspeed
    import torch.distributed as dist

    rank, b = dist.get_rank(), size["batch"]
    cfg = megamem_config(size, size["memory_tokens"])
    ids = random_ids(size["vocab"], 2 * b, size["seq"])
    mine = ids.chunk(2)[rank]
    z3, z3_model = _engine(cfg, 3, b)
    z0, _ = _engine(cfg, 0, b)
    torch.manual_seed(0)
    from megamem.model import build_model

    alone = build_model(cfg) if rank == 0 else None
    alone_opt = torch.optim.AdamW(alone.parameters(), lr=1e-5, fused=True) if alone is not None else None
    bank = list(z3_model.banks.parameters())

    def one_rank():
        if alone is not None:
            alone(ids, labels=ids).loss.backward()
            alone_opt.step()
            alone_opt.zero_grad(set_to_none=True)
        dist.barrier()

    def gather_bank():
        with deepspeed.zero.GatheredParameters(bank):
            pass

    res = alternate({"zero3": _engine_step(z3, mine), "zero0": _engine_step(z0, mine), "one_rank": one_rank,
                     "bank_gather": gather_bank}, iters, warmup, wall=True)
    t = {k: v["median_s"] for k, v in res.items()}
    return {"memory_tokens": size["memory_tokens"], "global_batch": 2 * b, "seq": size["seq"],
            "zero3_step_s": t["zero3"], "zero0_step_s": t["zero0"], "one_rank_step_s": t["one_rank"],
            "bank_gather_s": t["bank_gather"],
            "speedup_2_ranks_zero3": t["one_rank"] / t["zero3"], "zero3_over_zero0": t["zero3"] / t["zero0"],
            "bank_gather_fraction_of_zero3_step": 2 * t["bank_gather"] / t["zero3"]}


def _ep_worker(size: Dict, iters: int, warmup: int) -> Dict:
    import torch.distributed as dist

    from megamem.model import build_model
    from megamem.parallel.expert import apply_expert_parallel

    rank, b = dist.get_rank(), size["batch"]
    cfg = megamem_config(size, size["chapter_tokens"], use_chapters=True, num_chapters=size["chapters"],
                         top_k_chapters=size["top_k"], routing_strategy_train="token", memory_layer_placement="last_k",
                         memory_layer_k=1)
    torch.manual_seed(0)
    ep1 = build_model(cfg)
    ep2 = copy.deepcopy(ep1)
    apply_expert_parallel(ep2, 2)
    mine = random_ids(size["vocab"], 2 * b, size["seq"]).chunk(2)[rank]

    def fwd_bwd(model):
        def step():
            out = model(mine, labels=mine)
            (out.loss + sum(out.aux_losses.values())).backward()
            model.zero_grad(set_to_none=True)
        return step

    res = alternate({"ep1": fwd_bwd(ep1), "ep2": fwd_bwd(ep2)}, iters, warmup, wall=True)
    return {"memory_tokens": size["chapter_tokens"], "chapters": size["chapters"], "top_k": size["top_k"],
            "ep1_s": res["ep1"]["median_s"], "ep2_s": res["ep2"]["median_s"],
            "ep2_over_ep1": res["ep2"]["median_s"] / res["ep1"]["median_s"]}


def _worker(size: Dict, iters: int, warmup: int) -> Dict:
    return {"zero3": _zero_worker(size, iters, warmup), "expert_parallel": _ep_worker(size, iters, warmup)}


def run(size: Dict, iters: int, warmup: int) -> Dict:
    sys.path.insert(0, TESTS)
    from dist_utils import run_ranks  # 2 spawned gloo ranks pinned to their own cores, file:// rendezvous

    with tempfile.TemporaryDirectory() as tmp:
        return run_ranks(_worker, size, iters, warmup, tmp_path=tmp)[0]
