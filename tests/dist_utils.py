"""Run a function on N CPU ranks (gloo), each pinned to its own core; collect what rank 0 returns."""
from __future__ import annotations

import os
import pickle
import sys
import traceback

import torch.multiprocessing as mp

from megamem.parallel.distributed import free_port


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      MEGAMEM_INIT_METHOD=f"file://{out_dir}/rendezvous")
    try:
        from megamem.parallel.distributed import init_distributed

        init_distributed()
        result = fn(*args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        import torch.distributed as dist

        dist.barrier()  # tear down together: a gloo group whose peer is gone aborts at exit
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # The result is on disk: leave without C++ teardown. A pipeline rank's gloo/DeepSpeed threads can be
    # joinable at interpreter exit ("terminate called without an active exception", SIGABRT), ~1 run in 10.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, *args, world_size: int = 2, tmp_path, timeout: float = 300):
    """fn must be importable (module level). Returns the list of per-rank results."""
    out_dir = str(tmp_path)
    os.makedirs(out_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():  # a hung rank must not hang the suite
            p.kill()
            p.join()
    errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
    if errors or any(p.exitcode != 0 for p in procs):
        raise AssertionError(f"rank failed (exit codes {[p.exitcode for p in procs]}):\n" + "\n".join(errors))
    results = []
    for r in range(world_size):
        with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results
