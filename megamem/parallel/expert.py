"""Expert-parallel chapter shards: each of ep_size ranks stores num_chapters/ep_size chapters.

Chapters are experts: the model's token-routing path produces (query, chapter, gate) pairs; here
each pair is sent (all-to-all) to the rank that owns its chapter, that rank computes the pair's
partial attention (`pair_attention`, absorbed: raw bank rows, nothing projected) and sends back
(output, log-sum-exp), which the model merges as usual. Sequence routing is run as pairs too.

DeepSpeed's MoE machinery does the rest: `deepspeed.utils.groups` builds the expert-parallel and
expert-data-parallel groups, bank shards carry the expert attributes (`allreduce=False`,
`group_name`) so the engine reduces their gradients only within the expert-data-parallel group
(averaged by the data-parallel world size, like native MoE), and
`split_params_into_different_moe_groups_for_optimizer` gives them their own optimizer groups,
so each rank keeps only its chapters' Adam state. ZeRO stage <= 2 only (`check_layout`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups

from ..comm import all_to_all_single
from ..config import MegamemConfig
from ..memory.bank import MemoryBank
from ..memory.chapters import ChapterMemoryAttention, absorbed_pairs, tokens_per_chapter


def check_layout(cfg: MegamemConfig, zero_stage: int) -> Optional[str]:
    """None if the expert-parallel layout works with this ZeRO stage, else what to do instead."""
    ep = cfg.parallel.ep_size
    if ep > 1 and zero_stage >= 3:
        return (f"parallel.ep_size = {ep} shards chapters as experts, which DeepSpeed supports only with "
                f"ZeRO stage 1 or 2 (it refuses expert parameters under ZeRO-3): use a ZeRO-1/2 DeepSpeed config "
                f"(ds_configs/zero2.json) with ep_size {ep}, or keep ZeRO-3 and set parallel.ep_size: 1 "
                f"(ZeRO-3 then partitions the whole bank as a dense parameter)")
    return None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; backward sends gradients the other way."""

    @staticmethod
    def forward(ctx, x, send: List[int], recv: List[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return all_to_all_single(x, sum(recv), recv, send, group=group)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all_single(grad, sum(ctx.send), ctx.send, ctx.recv, group=ctx.group), None, None, None


class ChapterDispatch:
    """Drop-in for `absorbed_pairs` on a sharded bank: pairs go to their chapter's owner and back."""

    def __init__(self, group, ep_size: int, local_chapters: int):
        self.group, self.ep_size, self.local = group, ep_size, local_chapters

    def __call__(self, q, memory, rows_per_chapter, tok, chap, bias, scale, sparse):
        owner = chap // self.local
        order = torch.argsort(owner, stable=True)
        send = torch.bincount(owner, minlength=self.ep_size)
        recv = all_to_all_single(send, len(send), group=self.group)
        send_l, recv_l = send.tolist(), recv.tolist()
        go = lambda t: _AllToAll.apply(t, send_l, recv_l, self.group)  # noqa: E731
        back = lambda t: _AllToAll.apply(t, recv_l, send_l, self.group)  # noqa: E731
        rq, rb, rc = go(q[tok[order]]), go(bias[order]), go((chap % self.local)[order])
        arange = torch.arange(len(rc), device=q.device)
        out, lse = absorbed_pairs(rq, memory, rows_per_chapter, arange, rc, rb, scale, sparse)
        inv = torch.argsort(order)
        return back(out)[inv], back(lse)[inv]


class ChapterExperts(MoE):
    """Holds no parameters: tells the DeepSpeed engine the model has expert (chapter-shard) parameters.

    The engine looks for `deepspeed.moe.layer.MoE` modules to enable its expert-gradient and
    expert-optimizer paths; the experts themselves are the bank shards in `model.banks`.
    """

    def __init__(self, num_chapters: int, ep_size: int, group_name: str):
        nn.Module.__init__(self)
        self.num_experts, self.ep_size, self.expert_group_name = num_chapters, ep_size, group_name
        self.num_local_experts = num_chapters // ep_size

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine; the groups were made by `apply_expert_parallel`."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("ChapterExperts is a marker; chapters are read by the memory layers")


def apply_expert_parallel(model: nn.Module, ep_size: int, engine_experts: bool = True) -> str:
    """Shard every bank of a chapter model over the expert-parallel group; returns the group name.

    Call after the default process group exists and before `deepspeed.initialize`. Rank r of the
    group keeps chapters [r·C/ep, (r+1)·C/ep) of the bank it was built with (same seed on every
    rank ⇒ the shards of an ep_size run are exactly the rows of the ep_size = 1 bank).
    With memory.sparse_bank_grad, or engine_experts=False (scripts/train.py: megamem.train.chapter_banks),
    the shards are left to megamem.train's `RowSparseAdamW` (`expert_data_parallel_group` for its group), outside the
    engine's optimizer, so no MoE marker is added for the engine.
    """
    cfg = model.memory_config
    if not cfg.use_chapters:
        raise ValueError("expert parallelism shards chapters: memory.use_chapters is false")
    groups._create_expert_and_data_parallel(ep_size)
    name = f"ep_size_{ep_size}"
    group, rank = groups._get_expert_parallel_group(name), groups._get_expert_parallel_rank(name)
    local, rows = cfg.num_chapters // ep_size, tokens_per_chapter(cfg)
    for i, bank in enumerate(model.banks):
        if not isinstance(bank, MemoryBank):  # full or reduced-dim rows
            raise ValueError(f"expert parallelism shards banks stored as rows; bank {i} is {bank.kind}")
        shard = type(bank)(local * rows, bank.dim, bank.init_std).to(bank.memory.device)
        with torch.no_grad():
            shard.memory.copy_(bank.memory[rank * local * rows:(rank + 1) * local * rows])
        for p in shard.parameters():
            p.allreduce, p.group_name = False, name
        model.banks[i] = shard
    dispatch = ChapterDispatch(group, ep_size, local)
    for module in model.modules():
        if isinstance(module, ChapterMemoryAttention):
            module.expert = dispatch
    if engine_experts and not cfg.sparse_bank_grad:
        model.add_module("chapter_experts", ChapterExperts(cfg.num_chapters, ep_size, name))
    model.chapter_ep_size = ep_size
    return name


def expert_data_parallel_group(ep_size: int):
    """The ranks holding replicas of the same chapter shard (their gradients are averaged)."""
    return groups._get_expert_data_parallel_group(f"ep_size_{ep_size}")


def expert_parallel_group(ep_size: int):
    """The ranks whose shards together make whole banks."""
    return groups._get_expert_parallel_group(f"ep_size_{ep_size}")


def optimizer_param_groups(model: nn.Module, weight_decay: float = 0.0, lr: Optional[float] = None) -> List[Dict]:
    """Dense and expert (chapter-shard) parameter groups, split the way DeepSpeed's MoE expects.

    With memory.sparse_bank_grad the banks are left out: megamem.train.sparse_adamw.sparse_bank_optimizer
    updates them.
    """
    skip = {id(p) for p in model.banks.parameters()} if model.memory_config.sparse_bank_grad else set()
    group: Dict = {"name": "params", "weight_decay": weight_decay,
                   "params": [p for p in model.parameters() if p.requires_grad and id(p) not in skip]}
    if lr is not None:
        group["lr"] = lr
    return split_params_into_different_moe_groups_for_optimizer(group)
