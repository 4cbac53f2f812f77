import os

import pytest
import torch

from dist_utils import run_ranks


def _allreduce_and_affinity():
    import deepspeed.comm as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item(), sorted(os.sched_getaffinity(0)), dist.get_world_size()


def test_two_cpu_ranks_gloo_and_core_pinning(tmp_path):
    results = run_ranks(_allreduce_and_affinity, tmp_path=tmp_path)
    assert [r[0] for r in results] == [3.0, 3.0]
    assert all(r[2] == 2 for r in results)
    if len(os.sched_getaffinity(0)) < 2:  # a skip: under CI=true a failure (CI machines have 2 cores)
        pytest.skip("core pinning needs 2 CPU cores")
    assert not set(results[0][1]) & set(results[1][1])  # each rank on its own core
