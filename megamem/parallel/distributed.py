"""Process-group start-up for every launcher (deepspeed, torchrun, srun, plain python).

CPU runs use gloo and skip DeepSpeed's shm comm op, whose JIT compile costs ~40 s per start.
"""
from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> tuple:
    """(rank, local_rank, world_size) from the launcher's environment (1-process defaults).

    MEGAMEM_MPI=1 (mpirun launches) fills RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR from mpi4py first."""
    if os.environ.get("MEGAMEM_MPI") == "1" and "RANK" not in os.environ:
        from .slurm import discover_mpi

        os.environ.update(discover_mpi())
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    return rank, local, world


def pin_to_core(local_rank: int) -> None:
    """On CPU, give each local rank its own core (halves step time with 2 ranks on 2 cores)."""
    cores = sorted(os.sched_getaffinity(0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or len(cores)
    if len(cores) > 1 and per_node <= len(cores):
        share = max(len(cores) // per_node, 1)
        mine = cores[local_rank * share:(local_rank + 1) * share] or cores[local_rank % len(cores):][:1]
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))


def init_distributed(pin_cores: bool = True) -> tuple:
    """Start the default process group once; return (rank, local_rank, world_size)."""
    import deepspeed
    import deepspeed.comm as dist

    rank, local, world = rank_env()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # else DeepSpeed picks the host's external address
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with deepspeed, torchrun or srun")
        os.environ["MASTER_PORT"] = str(free_port())
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if pin_cores and world > 1:
            pin_to_core(local)
    if not dist.is_initialized():
        # MEGAMEM_INIT_METHOD (e.g. file:///tmp/x) replaces the TCP rendezvous: tests use it to avoid port races;
        # a single process rendezvouses through a private file (a free port can be taken before it is bound)
        init_method = os.environ.get("MEGAMEM_INIT_METHOD")
        if init_method is None and world == 1:
            import tempfile

            init_method = "file://" + os.path.join(tempfile.mkdtemp(prefix="megamem-pg-"), "store")
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", auto_mpi_discovery=False,
                                   verbose=False, init_method=init_method, rank=rank, world_size=world)
    if not on_cpu:
        torch.cuda.set_device(local)
    return rank, local, world
