"""The one path for megamem's own collectives: every tensor goes to the communication device first.

With DeepSpeed on GPUs the process group is NCCL, which has no CPU backend: a CPU tensor handed to
a collective fails (or hangs). gloo (CPU runs) needs CPU tensors. `comm_device(group)` is the device
the group's backend works on; every function here places its tensors there (`to_comm_device`) and
returns results on the caller's device. No other module of megamem calls torch.distributed or
deepspeed.comm collectives (tests/test_comm.py checks the source and, on 2 ranks, every call).
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def comm_device(group=None) -> torch.device:
    """cuda:<current device> for NCCL groups, cpu for gloo / mpi."""
    backend = dist.get_backend(group)
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_comm_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor on `device` (the same tensor when it is already there)."""
    return t.to(device)


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In place on `t` (whatever its device); returns `t`."""
    moved = to_comm_device(t, comm_device(group))
    dist.all_reduce(moved, op=OPS[op], group=group)
    if moved is not t:
        t.copy_(moved)
    return t


def all_gather(t: torch.Tensor, group=None) -> List[torch.Tensor]:
    """Every rank's `t` (same shape on all ranks), on t's device."""
    device = comm_device(group)
    moved = to_comm_device(t.contiguous(), device)
    parts = [to_comm_device(torch.empty_like(t), device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, moved, group=group)
    return [p.to(t.device) for p in parts]


def all_gather_counts(n: int, group=None) -> List[int]:
    """Every rank's integer `n`."""
    return [int(c) for c in all_gather(torch.tensor([n], dtype=torch.long), group)]


def all_to_all_single(x: torch.Tensor, out_rows: int, recv: Optional[List[int]] = None,
                      send: Optional[List[int]] = None, group=None) -> torch.Tensor:
    """Rows of x sent by `send` counts, `out_rows` rows received by `recv` counts (even split when None)."""
    device = comm_device(group)
    moved = to_comm_device(x.contiguous(), device)
    out = to_comm_device(x.new_empty((out_rows,) + tuple(x.shape[1:])), device)
    dist.all_to_all_single(out, moved, recv, send, group=group)
    return out.to(x.device)


def broadcast(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In place on `t`; returns `t`."""
    moved = to_comm_device(t, comm_device(group))
    dist.broadcast(moved, src=src, group=group)
    if moved is not t:
        t.copy_(moved)
    return t


def all_gather_object(obj: Any, group=None) -> List[Any]:
    """Every rank's picklable `obj` (torch picks the device for the pickled bytes itself)."""
    parts: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def barrier(group=None) -> None:
    dist.barrier(group=group)

