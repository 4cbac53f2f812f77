"""SLURM and MPI → the torch.distributed environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...).

Used by slurm/pretrain.sh and slurm/adapter.sh (no torch import: it runs once per task at start-up):

    python -m megamem.parallel.slurm rendezvous          # MASTER_ADDR/MASTER_PORT of this job, as shell exports
    python -m megamem.parallel.slurm hostfile PATH N     # DeepSpeed hostfile: every allocated host with N slots
    srun python -m megamem.parallel.slurm exec -- CMD... # per task: map SLURM_* to RANK/..., then exec CMD
    python -m megamem.parallel.slurm prepare RUN_NAME --config C [--deepspeed D] [--section.key V ...]
        # validate the config and overrides, write the resolved config to output_dir/slurm/RUN_NAME/,
        # print output_dir and what runs it, one a line: `train` (scripts/train.py) or `progressive`
        # (a schedule of phases: tools/progressive.py); bad input: one `error:` line, exit code 2

MPI launches (`mpirun -x MEGAMEM_MPI=1 python scripts/train.py ...`) are mapped by `mpi_env`, through
mpi4py (`pip install -e .[mpi]`), from `rank_env` in distributed.py.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from typing import Dict, List, Mapping, Tuple

PORT_BASE, PORT_SPAN = 20000, 20000


def tasks_per_node(spec: str) -> List[int]:
    """SLURM's compressed counts, e.g. '4(x2),3' → [4, 4, 3]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot read SLURM tasks-per-node '{spec}'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _need(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name, "") != "":
            return env[name]
    raise KeyError(f"{' or '.join(names)} is not set: run this inside an srun step")


def task_env(env: Mapping[str, str]) -> Dict[str, str]:
    """The torch.distributed variables of one srun task (one process per GPU or CPU rank)."""
    node = int(_need(env, "SLURM_NODEID"))
    per_node = tasks_per_node(_need(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    return {"RANK": _need(env, "SLURM_PROCID"), "LOCAL_RANK": _need(env, "SLURM_LOCALID"),
            "WORLD_SIZE": _need(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
            "LOCAL_WORLD_SIZE": str(per_node[node]), "NODE_RANK": str(node),
            "NNODES": _need(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")}


def rendezvous(env: Mapping[str, str], hosts: List[str]) -> Dict[str, str]:
    """MASTER_ADDR = the allocation's first host; MASTER_PORT derived from the job id, so every task
    (and a requeued run) computes the same one without talking. Both may be preset by the user."""
    if not hosts:
        raise ValueError("the allocation has no hosts")
    port = env.get("MASTER_PORT") or str(PORT_BASE + int(_need(env, "SLURM_JOB_ID")) % PORT_SPAN)
    return {"MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0], "MASTER_PORT": port}


def hostfile(hosts: List[str], slots: int) -> str:
    """DeepSpeed's hostfile format: one `host slots=N` line per node."""
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def allocated_hosts(env: Mapping[str, str]) -> List[str]:
    nodelist = _need(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()


def mpi_env(comm, hostname: str, shared_type: int) -> Dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR from an MPI communicator (mpi4py's COMM_WORLD).

    The local rank is the rank among the processes sharing this node's memory (Split_type with
    COMM_TYPE_SHARED); MASTER_ADDR is rank 0's host name."""
    local = comm.Split_type(shared_type)
    master = comm.bcast(hostname, root=0)
    return {"RANK": str(comm.Get_rank()), "WORLD_SIZE": str(comm.Get_size()), "LOCAL_RANK": str(local.Get_rank()),
            "LOCAL_WORLD_SIZE": str(local.Get_size()), "MASTER_ADDR": master}


def discover_mpi() -> Dict[str, str]:
    """mpi4py discovery for `MEGAMEM_MPI=1` launches; MASTER_PORT stays the user's or 29500."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("MEGAMEM_MPI=1 needs mpi4py: pip install -e .[mpi]") from e
    return {**mpi_env(MPI.COMM_WORLD, socket.gethostname(), MPI.COMM_TYPE_SHARED), "MASTER_PORT": os.environ.get("MASTER_PORT", "29500")}


def prepare(run_name: str, args: List[str]) -> Tuple[str, str]:
    """Check a run's arguments before anything starts; record the resolved config; return output_dir and
    `train` (one scripts/train.py run) or `progressive` (training.mode's phases, one run each: tools/progressive.py)."""
    import argparse

    from ..config import ConfigError, load_config, save_config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--deepspeed")
    known, overrides = parser.parse_known_args(args)
    if not known.config:
        raise ConfigError("no config given: sbatch slurm/pretrain.sh CONFIG [--section.key VALUE ...]")
    if known.deepspeed and not os.path.isfile(known.deepspeed):
        raise ConfigError(f"DeepSpeed config not found: {known.deepspeed}")
    cfg = load_config(known.config, overrides)
    run_dir = os.path.join(cfg.training.output_dir, "slurm", run_name)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    schedule = cfg.training.mode != "full" and cfg.training.phase is None
    return cfg.training.output_dir, "progressive" if schedule else "train"


def main(argv: List[str]) -> int:
    if argv[:1] == ["prepare"] and len(argv) > 2:
        from ..config import ConfigError

        try:
            print("\n".join(prepare(argv[1], argv[2:])))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if argv[:1] == ["rendezvous"]:
        for key, value in rendezvous(os.environ, allocated_hosts(os.environ)).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if argv[:1] == ["hostfile"] and len(argv) == 3:
        with open(argv[1], "w", encoding="utf-8") as f:
            f.write(hostfile(allocated_hosts(os.environ), int(argv[2])))
        return 0
    if argv[:2] == ["exec", "--"] and len(argv) > 2:
        os.environ.update(task_env(os.environ))
        # a preemption notice forwarded by srun before the program has installed its handler must not
        # kill the task (USR1's default action); an ignored disposition survives exec, the handler replaces it
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        os.execvp(argv[2], argv[2:])
    print("usage: python -m megamem.parallel.slurm rendezvous | hostfile PATH SLOTS | exec -- CMD... | "
          "prepare RUN_NAME --config C [...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
