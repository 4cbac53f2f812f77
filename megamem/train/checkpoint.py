"""Checkpoints: DeepSpeed engine state + per-rank run state (data position, RNG), committed atomically.

Layout of `output_dir/checkpoints/`:
    step00000100/            engine files (DeepSpeed), run_state_rank{r}.json, config.yaml, tokenizer/, COMPLETE
    latest                   name of the newest COMPLETE checkpoint (replaced atomically)
    best                     name of the checkpoint with the lowest eval loss
A checkpoint counts only once COMPLETE exists, written after every rank finished; `latest` is
switched after that, so a process killed mid-save leaves `latest` on the previous checkpoint.
Engine files load with `torch.load(weights_only=True)`: no pickled code runs on resume. The reading side
(marker, `latest`, safe loading) is megamem.parallel.checkpoint_files, which readers of weights share.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from ..comm import barrier
from ..config import ConfigError
from ..parallel.checkpoint_files import COMPLETE, complete_tags, resolve_resume, safe_torch_load  # noqa: F401 (re-exported)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> Dict[str, Any]:
    state = {"python": repr(random.getstate()), "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


class CheckpointManager:
    def __init__(self, output_dir: str, rank: int, world_size: int, save_total_limit: Optional[int]):
        self.dir = os.path.join(output_dir, "checkpoints")
        self.rank, self.world_size, self.limit = rank, world_size, save_total_limit

    def save(self, engine, step: int, run_state: Dict[str, Any], config_yaml: str, tokenizer=None,
             best: bool = False, write_extra: Optional[Callable[[str], None]] = None) -> str:
        """write_extra(checkpoint folder): each rank's own files (chapter bank shards), before COMPLETE."""
        tag = tag_for(step)
        path = os.path.join(self.dir, tag)
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.isdir(path):  # a leftover of an interrupted save, or a re-save of the same step
                shutil.rmtree(path)
        barrier()
        engine.save_checkpoint(self.dir, tag=tag, save_latest=False)
        if write_extra is not None:
            write_extra(path)
        _atomic_write(os.path.join(path, f"run_state_rank{self.rank}.json"),
                      json.dumps({**run_state, "world_size": self.world_size, "rng": rng_state()}))
        if self.rank == 0:
            _atomic_write(os.path.join(path, "config.yaml"), config_yaml)
            if tokenizer is not None:
                tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        barrier()
        if self.rank == 0:
            _atomic_write(os.path.join(path, COMPLETE), f"{step}\n")
            _atomic_write(os.path.join(self.dir, "latest"), tag)
            if best:
                _atomic_write(os.path.join(self.dir, "best"), tag)
            self._rotate()
        barrier()
        return tag

    def mark_best(self, tag: str) -> None:
        if self.rank == 0:
            _atomic_write(os.path.join(self.dir, "best"), tag)

    def _rotate(self) -> None:
        if not self.limit:
            return
        keep = set(complete_tags(self.dir)[-self.limit:])
        best = os.path.join(self.dir, "best")
        if os.path.isfile(best):
            keep.add(open(best, encoding="utf-8").read().strip())
        for tag in os.listdir(self.dir):
            full = os.path.join(self.dir, tag)
            if os.path.isdir(full) and tag not in keep and os.path.isfile(os.path.join(full, COMPLETE)):
                shutil.rmtree(full)

    def run_state(self, ckpt_dir: str, tag: str) -> Dict[str, Any]:
        """This rank's run state in a checkpoint (step, data position, layout, RNG)."""
        state_path = os.path.join(ckpt_dir, tag, f"run_state_rank{self.rank}.json")
        if not os.path.isfile(state_path):
            raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} has no state for rank {self.rank}: "
                              f"it was written by a run with fewer ranks")
        try:
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{state_path}: not a readable run state ({e}); the checkpoint is damaged: resume "
                              "from an earlier one") from None
        if not isinstance(state, dict) or not {"step", "world_size", "rng"} <= set(state):
            raise ConfigError(f"{state_path}: not a megamem run state (no step / world_size / rng)")
        return state

    def load(self, engine, ckpt_dir: str, tag: str) -> Dict[str, Any]:
        """Restore engine state and return this rank's run state (RNG already restored)."""
        state = self.run_state(ckpt_dir, tag)
        if state["world_size"] != self.world_size:
            raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} was written by {state['world_size']} ranks; "
                              f"this run has {self.world_size}. Resume with the same number of ranks")
        where = os.path.join(ckpt_dir, tag)
        try:
            with safe_torch_load():
                load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        except (AssertionError, KeyError) as e:  # DeepSpeed's own checks: another ZeRO stage, partitioning, ...
            raise ConfigError(f"checkpoint {where} does not fit this run's parallel layout ({type(e).__name__}"
                              f"{': ' + str(e).splitlines()[0] if str(e) else ''}); resume with the ZeRO stage, "
                              "world size and pipeline stages it was written with, or start a new run from its "
                              f"weights with --training.init_from {where}") from None
        if load_path is None:
            raise ConfigError(f"DeepSpeed found no engine state in {os.path.join(ckpt_dir, tag)}")
        set_rng_state(state["rng"])
        return state
