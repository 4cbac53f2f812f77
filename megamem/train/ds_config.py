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
from ..parallel.layout import pipeline_stages, zero_stage  # noqa: F401 (re-exported)


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


def _resolve_pipeline(ds: Dict[str, Any], cfg: MegamemConfig, where: str) -> int:
    """parallel.pipeline_stages (YAML) or pipeline.stages (JSON): one number, written into the JSON."""
    section = ds.get("pipeline")
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{where}: pipeline must be a JSON object, e.g. {{\"stages\": 2}}")
    from_json = (section or {}).get("stages", "auto")
    if from_json != "auto" and (isinstance(from_json, bool) or not isinstance(from_json, int) or from_json < 1):
        raise ConfigError(f"{where}: pipeline.stages must be a positive integer or \"auto\", got {from_json!r}")
    from_yaml = cfg.parallel.pipeline_stages
    if from_yaml is None:
        stages = 1 if from_json == "auto" else from_json
    else:
        _fill(ds, ["pipeline", "stages"], from_yaml, "parallel.pipeline_stages", where)
        stages = from_yaml
    if section is not None or stages > 1:
        ds.setdefault("pipeline", {})["stages"] = stages
        # DeepSpeed's reentrant checkpoint cannot back-propagate twice through one segment, and a stage
        # sends two float tensors (hidden states, router losses): recompute with the non-reentrant one
        ds["pipeline"].setdefault("use_reentrant", False)
        _fill(ds, ["pipeline", "activation_checkpoint_interval"], cfg.parallel.activation_checkpoint_interval,
              "parallel.activation_checkpoint_interval", where)
    return stages


def layout_problems(cfg: MegamemConfig, ds: Dict[str, Any], on_cuda: bool, world_size: int = 1) -> List[str]:
    """Combinations DeepSpeed or megamem cannot run, each with the fix."""
    problems = []
    stage = zero_stage(ds)
    if cfg.training.mixed_precision == "fp16" and not on_cuda:
        problems.append("training.mixed_precision: fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or no")
    from ..config.trunk_lora import four_bit_type, precision_problem  # a 4-bit trunk (quantization_type)

    message = precision_problem(cfg, on_cuda)
    if message:
        problems.append(message)
    elif four_bit_type(cfg.training) and (stage == 3 or pipeline_stages(ds) > 1):
        problems.append(f"training.quantization_type: {cfg.training.quantization_type} (a 4-bit trunk) runs on "
                        "ZeRO-0/1/2 without pipeline stages: bitsandbytes' packed weights cannot be partitioned or "
                        "cut into stages; use ds_configs/zero2.json, or training.quantization_type: bf16 with "
                        "mixed_precision: no")
    if cfg.training.mixed_precision == "fp8":  # refused here, before any model is built (megamem/train/float8.py)
        from .float8 import device_capability, float8_problem, torchao_available

        message = float8_problem(device_capability(), torchao_available())
        if message:
            return [message]
        if pipeline_stages(ds) > 1:
            problems.append("training.mixed_precision: fp8 is not wired for pipeline stages; use bf16 or no pipeline")
    from .chapter_banks import layout_problem

    message = None
    if cfg.parallel.ep_size > 1:
        from ..parallel.expert import check_layout  # imports DeepSpeed's MoE: only for expert-parallel runs

        message = check_layout(cfg, stage)
    # one message per layout: check_layout's (ZeRO-3 + EP), else the chapter banks' own
    message = message or layout_problem(cfg, stage, world_size, pipeline_stages(ds) > 1)
    if message:
        problems.append(message)
    from .peer_tables import layout_problem as tables_problem

    message = tables_problem(cfg, stage, pipeline_stages(ds) > 1)
    if message:
        problems.append(message)
    if cfg.model.base_model_name is not None and cfg.memory.use_chapters and stage == 3:
        problems.append("memory.use_chapters on an adapter model (model.base_model_name set) trains with ZeRO stage "
                        "0, 1 or 2 (ZeRO-3 is not wired for chapter branches added to an HF model); use "
                        "ds_configs/zero2.json or set use_chapters: false")
    stages = pipeline_stages(ds)
    if stages > 1:
        problems += _pipeline_problems(cfg, stage, stages, world_size)
    from .trainable import policy_problem

    message = policy_problem(cfg, stages > 1)
    if message:
        problems.append(message)
    return problems


def _pipeline_problems(cfg: MegamemConfig, stage: int, stages: int, world_size: int) -> List[str]:
    problems = []
    if stage >= 2:
        problems.append(f"pipeline parallelism ({stages} stages) runs with ZeRO stage 0 or 1 only (DeepSpeed refuses "
                        f"ZeRO-2/3 with pipelines); set zero_optimization.stage to 0 or 1 (ds_configs/pipeline.json)")
    if world_size % stages:
        problems.append(f"pipeline.stages = {stages} must divide the world size ({world_size} rank"
                        f"{'s' if world_size > 1 else ''}); launch a multiple of {stages} ranks "
                        f"(e.g. deepspeed --num_gpus {stages}) or set parallel.pipeline_stages")
    if cfg.parallel.ep_size > 1:
        problems.append("parallel.ep_size > 1 cannot be combined with pipeline stages; use ep_size: 1")
    if cfg.model.base_model_name is not None:
        problems.append("memory adapters on a pretrained model (model.base_model_name) do not run as a pipeline; "
                        "use ZeRO-2/3 (ds_configs/zero2.json, zero3.json)")
    if cfg.training.gradient_checkpointing:
        problems.append("training.gradient_checkpointing: under a pipeline use parallel.activation_checkpoint_interval "
                        "(e.g. 1) instead, and set gradient_checkpointing: false")
    if cfg.model.num_layers < stages:
        problems.append(f"pipeline.stages = {stages} exceeds model.num_layers ({cfg.model.num_layers}): "
                        "every stage needs at least one block")
    if cfg.training.time_step_masking:
        problems.append("training.time_step_masking is not wired for pipeline stages (their loss is the causal one); "
                        "use ZeRO-0/1/2/3 without a pipeline")
    return problems


def resolve_ds_config(path: Optional[str], cfg: MegamemConfig, world_size: int,
                      on_cuda: Optional[bool] = None) -> Dict[str, Any]:
    """The DeepSpeed config dict to pass to deepspeed.initialize (defaults to ZeRO-0 without --deepspeed)."""
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    where = path or "<default DeepSpeed config>"
    ds = copy.deepcopy(load_ds_json(path)) if path else {"zero_optimization": {"stage": 0}}
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be a JSON object, e.g. {{\"stage\": 3}}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage = {stage!r}; valid: 0, 1, 2, 3 (ds_configs/zero*.json)")
    if cfg.training.distributed_strategy == "ddp" and stage > 0:
        raise ConfigError(f"training.distributed_strategy: ddp means whole replicas per rank (ZeRO-0), but {where} "
                          f"has zero_optimization.stage {stage}; set distributed_strategy: deepspeed, or use "
                          "ds_configs/zero0.json")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{where}: remove the '{section}' section: megamem builds the {section} from the YAML "
                              f"(training.optimizer / training.scheduler and the learning rates)")
    t = cfg.training
    stages = _resolve_pipeline(ds, cfg, where)
    data_parallel = max(world_size // stages, 1)  # a pipeline's stages see the same batch
    _fill(ds, ["train_micro_batch_size_per_gpu"], t.batch_size, "training.batch_size", where)
    _fill(ds, ["gradient_accumulation_steps"], t.gradient_accumulation_steps, "training.gradient_accumulation_steps",
          where)
    _fill(ds, ["train_batch_size"], t.batch_size * t.gradient_accumulation_steps * data_parallel,
          "training.batch_size × gradient_accumulation_steps × data-parallel size (world size / pipeline stages)",
          where)
    _fill(ds, ["gradient_clipping"], float(t.max_grad_norm), "training.max_grad_norm", where)
    if t.optimizer == "sgd" and stage > 0:
        # DeepSpeed's ZeRO asserts on optimizers outside its tested list; torch SGD's update is elementwise, so
        # applying it to each rank's partition is exact (tests/test_train.py compares ZeRO-1/3 with ZeRO-0)
        _fill(ds, ["zero_allow_untested_optimizer"], True, "training.optimizer: sgd", where)
    _fill(ds, ["bf16", "enabled"], t.mixed_precision in ("bf16", "fp8"), "training.mixed_precision", where)
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
    stages = pipeline_stages(ds)
    replicas = max(world_size // stages, 1)
    micro = ds["gradient_accumulation_steps"]
    plural = lambda n, word, many: f"{n} {word if n == 1 else many}"  # noqa: E731
    pipe = (f"; pipeline: {stages} stages × {plural(replicas, 'data-parallel replica', 'data-parallel replicas')}, "
            f"{plural(micro, 'micro-batch', 'micro-batches')} per step") if stages > 1 else ""
    return (f"world size {world_size}, ZeRO-{stage}: {shards.get(stage, '?')}{pipe}"
            f"{'; offload: ' + ', '.join(offload) if offload else ''}; {precision}; micro-batch "
            f"{ds['train_micro_batch_size_per_gpu']} × accumulation {micro} × "
            f"{plural(replicas, 'replica', 'replicas') if stages > 1 else f'{world_size} ranks'} = "
            f"{ds['train_batch_size']} sequences per step")
