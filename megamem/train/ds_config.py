"""DeepSpeed JSON + megamem YAML → one resolved DeepSpeed config, with the YAML as the single source.

Batch size, accumulation, clipping and precision live in the YAML; the JSON says "auto" for them
(or repeats the same value). The optimizer and schedule are built by megamem from the YAML, so
the JSON must not carry its own. Impossible layouts are refused here, before any process group.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List, Optional

import torch

from ..config import ConfigError, MegamemConfig


def load_ds_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path} (see ds_configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def _fill(ds: Dict[str, Any], key_path: List[str], value: Any, yaml_key: str, where: str) -> None:
    """Set ds[key_path] = value where it is "auto" or absent; a different explicit value is an error."""
    node = ds
    for k in key_path[:-1]:
        node = node.setdefault(k, {})
    leaf = key_path[-1]
    current = node.get(leaf, "auto")
    if current != "auto" and current != value:
        raise ConfigError(f"{where}: {'.'.join(key_path)} = {current!r} conflicts with {yaml_key} = {value!r} in the "
                          f"YAML; set it to \"auto\" in the JSON (the YAML is the one source of truth)")
    node[leaf] = value


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def layout_problems(cfg: MegamemConfig, ds: Dict[str, Any], on_cuda: bool, world_size: int = 1) -> List[str]:
    """Combinations DeepSpeed or megamem cannot run, each with the fix."""
    problems = []
    stage = zero_stage(ds)
    if cfg.training.mixed_precision == "fp16" and not on_cuda:
        problems.append("training.mixed_precision: fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or no")
    if cfg.parallel.ep_size > 1:
        from ..parallel.expert import check_layout

        message = check_layout(cfg, stage)
        if message:
            problems.append(message)
    if cfg.parallel.ep_size > 1 and stage < 3:
        problems.append(f"parallel.ep_size = {cfg.parallel.ep_size}: expert-parallel chapter shards train through "
                        "the Python API (megamem.parallel.expert) but not yet through scripts/train.py, whose "
                        "checkpoints cannot hold the shards; use ep_size: 1 (ZeRO-3 partitions a dense bank)")
    if cfg.memory.use_chapters and cfg.memory.sparse_bank_grad:
        problems.append("memory.sparse_bank_grad: row-sparse bank updates (RowSparseAdamW, see the Chapters section) "
                        "are not wired into scripts/train.py yet; set sparse_bank_grad: false (dense bank gradients "
                        "work with every layout)")
    if cfg.model.base_model_name is not None and cfg.memory.use_chapters and stage == 3:
        problems.append("memory.use_chapters on an adapter model (model.base_model_name set) trains with ZeRO stage "
                        "0, 1 or 2 (ZeRO-3 is not wired for chapter branches added to an HF model); use "
                        "ds_configs/zero2.json or set use_chapters: false")
    if ds.get("pipeline") and stage >= 2:
        problems.append("pipeline parallelism runs with ZeRO stage 0 or 1 only (DeepSpeed refuses ZeRO-2/3 with pipelines)")
    return problems


def resolve_ds_config(path: Optional[str], cfg: MegamemConfig, world_size: int,
                      on_cuda: Optional[bool] = None) -> Dict[str, Any]:
    """The DeepSpeed config dict to pass to deepspeed.initialize (defaults to ZeRO-0 without --deepspeed)."""
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    where = path or "<default DeepSpeed config>"
    ds = copy.deepcopy(load_ds_json(path)) if path else {"zero_optimization": {"stage": 0}}
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{where}: remove the '{section}' section: megamem builds the {section} from the YAML "
                              f"(training.optimizer / training.scheduler and the learning rates)")
    t = cfg.training
    _fill(ds, ["train_micro_batch_size_per_gpu"], t.batch_size, "training.batch_size", where)
    _fill(ds, ["gradient_accumulation_steps"], t.gradient_accumulation_steps, "training.gradient_accumulation_steps",
          where)
    _fill(ds, ["train_batch_size"], t.batch_size * t.gradient_accumulation_steps * world_size,
          "training.batch_size × gradient_accumulation_steps × world size", where)
    _fill(ds, ["gradient_clipping"], float(t.max_grad_norm), "training.max_grad_norm", where)
    _fill(ds, ["bf16", "enabled"], t.mixed_precision == "bf16", "training.mixed_precision", where)
    _fill(ds, ["fp16", "enabled"], t.mixed_precision == "fp16", "training.mixed_precision", where)
    ds.setdefault("steps_per_print", 10**9)
    problems = layout_problems(cfg, ds, on_cuda, world_size)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return ds


def describe_layout(ds: Dict[str, Any], world_size: int) -> str:
    stage = zero_stage(ds)
    zero = ds.get("zero_optimization", {})
    offload = [k.replace("offload_", "") for k in ("offload_param", "offload_optimizer")
               if zero.get(k, {}).get("device") not in (None, "none")]
    shards = {0: "nothing sharded (data parallel)", 1: "optimizer state sharded",
              2: "optimizer state + gradients sharded", 3: "parameters (banks included) + gradients + optimizer state sharded"}
    precision = "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
    return (f"world size {world_size}, ZeRO-{stage}: {shards.get(stage, '?')}"
            f"{'; offload: ' + ', '.join(offload) if offload else ''}; {precision}; micro-batch "
            f"{ds['train_micro_batch_size_per_gpu']} × accumulation {ds['gradient_accumulation_steps']} × "
            f"{world_size} ranks = {ds['train_batch_size']} sequences per step")
