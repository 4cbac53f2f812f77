"""Every collective megamem issues goes through megamem.comm, which places its tensors on the device the
process group's backend works on (NCCL: the current GPU; gloo: CPU). NCCL has no CPU backend, so a
CPU tensor reaching a collective would end every multi-GPU run on its first step.

On this CPU machine the check is made testable by tagging: `to_comm_device` is wrapped so every
tensor it places becomes an `OnCommDevice` instance, and torch.distributed's collectives are wrapped
to record, for each call made from megamem's own code, whether every tensor it received was placed
by the helper, and on the device the helper was told to use. A call from any other megamem file, or
with a tensor the helper never placed, is a failure. DeepSpeed's own collectives are not megamem's.
"""
import ast
import os
import sys

import torch

from conftest import ROOT
from dist_utils import run_ranks

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "all_to_all", "all_to_all_single", "reduce_scatter", "reduce_scatter_tensor",
               "reduce", "barrier", "gather", "scatter", "send", "recv", "isend", "irecv"}
COMM_FILE = os.path.join(ROOT, "megamem", "comm.py")


def _distributed_aliases(tree) -> set:
    """Names a file binds to torch.distributed / deepspeed.comm (import … as X, from torch import distributed)."""
    names = {"torch.distributed", "deepspeed.comm"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name in ("torch.distributed", "deepspeed.comm") and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "deepspeed"):
            names |= {a.asname or a.name for a in node.names if a.name in ("distributed", "comm")}
    return names


def test_only_megamem_comm_issues_collectives():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "megamem")):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == COMM_FILE:
                continue
            tree = ast.parse(open(path, encoding="utf-8").read())
            aliases = _distributed_aliases(tree)
            for node in ast.walk(tree):
                called = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in COLLECTIVES and ast.unparse(node.func.value) in aliases
                imported = isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "deepspeed.comm") \
                    and any(a.name in COLLECTIVES for a in node.names)
                if called or imported:
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not offenders, f"collectives outside megamem/comm.py: {offenders}"


def test_comm_device_follows_the_backend(monkeypatch):
    from megamem import comm

    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "gloo")
    assert comm.comm_device() == torch.device("cpu")


class OnCommDevice(torch.Tensor):
    """A tensor placed by megamem.comm.to_comm_device (the tag the spies look for)."""


def _spied_training(out):
    """A 2-rank expert-parallel, row-sparse chapter run (flags, eval totals, all-to-all dispatch, sparse
    gradient gathers, checkpoint barriers, bank export) with every collective call recorded."""
    import torch.distributed as dist

    from megamem import comm
    from test_train import _banks_run

    told = []
    place = comm.to_comm_device

    def tagged(t, device):
        told.append(device)
        return place(t, device).as_subclass(OnCommDevice)

    comm.to_comm_device = tagged
    calls = []

    def spy(name, real):
        def collective(*args, **kwargs):
            caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
            if caller.startswith(os.path.join(ROOT, "megamem")):
                tensors = [a for a in list(args) + list(kwargs.values()) for a in (a if isinstance(a, list) else [a])
                           if isinstance(a, torch.Tensor)]
                calls.append({"name": name, "caller": os.path.relpath(caller, ROOT),
                              "placed": all(isinstance(t, OnCommDevice) for t in tensors),
                              "devices": sorted({str(t.device) for t in tensors}), "tensors": len(tensors)})
            return real(*args, **kwargs)
        return collective

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, spy(name, getattr(dist, name)))
    _banks_run(out, 2, 2, ("memory.sparse_bank_grad=true", "training.max_grad_norm=1.0"))
    return {"calls": calls, "told": sorted({str(d) for d in told})}


def test_every_collective_of_a_training_run_goes_through_the_helper(tmp_path):
    ranks = run_ranks(_spied_training, str(tmp_path / "run"), world_size=2, tmp_path=tmp_path / "r")
    for result in ranks:
        calls = result["calls"]
        assert result["told"] == ["cpu"]  # gloo: the helper was told the CPU
        outside = [c for c in calls if c["caller"] != os.path.join("megamem", "comm.py")]
        assert not outside, outside
        unplaced = [c for c in calls if c["tensors"] and not c["placed"]]
        assert not unplaced, unplaced
        names = {c["name"] for c in calls}
        # the run exercised every kind of collective megamem issues in training
        assert {"all_reduce", "all_gather", "all_to_all_single", "barrier"} <= names, names


def test_memory_holds_no_distributed_code():
    """memory/ is single-process math; reductions and optimisers of banks live in train/ and parallel/."""
    offenders = []
    folder = os.path.join(ROOT, "megamem", "memory")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else []
            bad = [m for m in modules if m.startswith(("torch.distributed", "deepspeed", "..comm", "..parallel",
                                                       "..train", "megamem.comm", "megamem.parallel", "megamem.train"))]
            bad += [a.name for a in getattr(node, "names", []) if isinstance(node, ast.ImportFrom)
                    and node.module in ("torch", "..") and a.name in ("distributed", "comm", "parallel", "train")]
            offenders += [f"memory/{name}:{node.lineno} imports {m}" for m in bad]
    assert not offenders, offenders
