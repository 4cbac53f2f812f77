"""The run an output_dir holds, checked before a run writes anything.

- A new run never lands on an old one: an output_dir that already holds a run (checkpoints, a final
  model, metrics.jsonl) is refused unless the run is resumed.
- A resume continues the run it names: the same model and memory, the same parallel layout, and a
  run that has steps left; changed training keys are listed, since each takes effect from the
  checkpoint's step (a longer max_steps recomputes the schedule for the new total).
- The log reads as one run: records of steps after the checkpoint (redone after a crash) are dropped.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

import yaml

from ..config import ConfigError, MegamemConfig, config_to_dict
from .checkpoint import _atomic_write, complete_tags

RUN_FILES = ("checkpoints", "final", "metrics.jsonl")
LAYOUT_KEYS = ("zero_stage", "pipeline_stages", "ep_size", "world_size")
# keys that may differ between a run and its resume without changing what is trained
# model keys that change neither the parameters nor what they compute in training: reported, not refused
NEUTRAL_MODEL_KEYS = {"model.tokenizer_name", "model.use_flash_attention", "memory.memory_gradient_checkpointing",
                      "memory.routing_strategy_inference", "memory.rolling_interval", "memory.rolling_window"}
POLICY_KEYS = ("training.trainable", "training.frozen")  # which parameters the optimizer holds: fixed for a run
NEUTRAL_TRAINING_KEYS = {"resume_from_checkpoint", "output_dir", "logging_steps", "log_to_wandb", "wandb_project",
                         "wandb_run_name", "save_steps", "save_total_limit", "eval_steps", "eval_max_batches",
                         "eval_long_context"}


def describe_run(output_dir: str) -> Optional[str]:
    """What megamem left in output_dir, in words, or None when it holds no run."""
    found = []
    final = os.path.join(output_dir, "final")
    if os.path.isdir(final):
        found.append("a final model (final/)")
    tags = complete_tags(os.path.join(output_dir, "checkpoints"))
    if tags:
        found.append(f"checkpoints up to step {int(tags[-1].removeprefix('step'))}")
    elif os.path.isdir(os.path.join(output_dir, "checkpoints")):
        found.append("an incomplete checkpoint")
    if os.path.isfile(os.path.join(output_dir, "metrics.jsonl")):
        found.append("metrics.jsonl")
    return ", ".join(found) or None


def check_output_dir(cfg: MegamemConfig) -> None:
    """Refuse an output_dir that is a file, or that holds a run this config does not resume."""
    out = cfg.training.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"training.output_dir {out} is a file; give a folder (it is created if missing)")
    held = describe_run(out) if os.path.isdir(out) else None
    if held and not cfg.training.resume_from_checkpoint:
        raise ConfigError(f"training.output_dir {out} already holds a run ({held}); megamem never overwrites a run: "
                          "continue it with --training.resume_from_checkpoint latest, or choose another output_dir")


def layout_of(ds: Dict[str, Any], cfg: MegamemConfig, world_size: int) -> Dict[str, int]:
    from .ds_config import pipeline_stages, zero_stage

    return {"zero_stage": zero_stage(ds), "pipeline_stages": pipeline_stages(ds),
            "ep_size": cfg.parallel.ep_size, "world_size": world_size}


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(old: Dict[str, Any], new: Dict[str, Any], keys) -> List[str]:
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_resume(cfg: MegamemConfig, ckpt_path: str, state: Dict[str, Any], layout: Dict[str, int],
                 total_steps: int) -> List[str]:
    """Refuse a resume of another model, another layout, or a finished run; return the changed
    training/data keys (each `section.key: old → new`) for the caller to report."""
    step = state["step"]
    where = f"checkpoint {ckpt_path}"
    old_layout = state.get("layout")
    if old_layout is not None:
        changed = _differences(old_layout, layout, LAYOUT_KEYS)
        if changed:
            raise ConfigError(f"{where} was written under another parallel layout ({'; '.join(changed)}); resume "
                              "with the same layout, or start a new run from its weights with "
                              f"--training.init_from {ckpt_path}")
    config_file = os.path.join(ckpt_path, "config.yaml")
    changed_training: List[str] = []
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            old = _flat(yaml.safe_load(f) or {})
        new = _flat(config_to_dict(cfg))
        model_keys = sorted(k for k in set(old) | set(new) if k.startswith(("model.", "memory."))
                            and k not in NEUTRAL_MODEL_KEYS)
        changed = _differences(old, new, model_keys)
        if changed:
            raise ConfigError(f"{where} holds another model ({'; '.join(changed[:4])}"
                              f"{'; …' if len(changed) > 4 else ''}); a resume continues the same model: restore "
                              f"those keys, or start a new run from its weights with --training.init_from {ckpt_path}")
        policy = _differences(old, new, POLICY_KEYS)
        if policy:
            raise ConfigError(f"{where} trained another set of parameters ({'; '.join(policy)}); its optimizer state "
                              "holds those: restore the keys, or start a new run from its weights with "
                              f"--training.init_from {ckpt_path}")
        rest = sorted(k for k in set(old) | set(new) if (k.startswith(("training.", "data.", "parallel."))
                      and k.split(".", 1)[1] not in NEUTRAL_TRAINING_KEYS and k not in POLICY_KEYS)
                      or k in NEUTRAL_MODEL_KEYS)
        changed_training = _differences(old, new, rest)
    if step >= total_steps:
        raise ConfigError(f"{where} is at step {step} and this run trains {total_steps} steps: the run is finished, "
                          "there is nothing to resume. To train further raise training.max_steps (the schedule is "
                          "then recomputed for the new total)")
    return changed_training


def report_changes(changed: List[str], step: int, rank: int) -> None:
    if changed and rank == 0:
        print(f"warning: resuming at step {step} with changed keys (each takes effect from there): "
              + "; ".join(changed), file=sys.stderr, flush=True)


def truncate_metrics(output_dir: str, step: int) -> int:
    """Drop metrics.jsonl records of steps after `step` (a crashed run redoes them); returns how many."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        _atomic_write(path, "".join(f"{line}\n" for line in keep))
    return len(lines) - len(keep)


__all__ = ["check_output_dir", "check_resume", "describe_run", "layout_of", "report_changes", "truncate_metrics"]
