"""Stack-Wise training measured side by side: full vs blockwise-frozen vs fused with LoRA on the trunk.

From one base config (its model, data, seed, batch and its progressive schedule: block_size, total_blocks)
three arms are derived that train the same number of tokens:

- `full`: training.mode full, every layer trains in one run of S steps (no schedule keys, no trunk LoRA);
- `blockwise_frozen`: mode blockwise, fusion_mode frozen, S / phases steps per phase, no trunk LoRA;
- `fused_lora`: mode fused, fusion_mode frozen, LoRA on the trunk (training.qlora_enabled, the base's LoRA
  keys or their defaults), S / phases steps per phase.

Every arm logs every step (logging_steps 1) so its summed step time covers all of its steps. The rows read
each arm's own metrics.jsonl (megamem.eval.phase_curves) — nothing is recomputed. tools/bench_progressive.py
runs the arms; docs/progressive.md shows a measured table.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, Optional

from ..config import ConfigError, MegamemConfig, validate
from ..config.progressive import SCHEDULE_KEYS, block_size, total_blocks
from ..config.schema import TrunkLoraConfig
from ..train.progressive import phase_config, phase_dir
from .phase_curves import phase_summaries, run_summary

ARMS = ("full", "blockwise_frozen", "fused_lora")


def tokens_per_step(cfg: MegamemConfig) -> int:
    """Tokens one optimizer step trains on one data-parallel rank (the arms run as one process)."""
    t = cfg.training
    return t.batch_size * t.max_length * t.gradient_accumulation_steps


def _without_trunk_lora(cfg: MegamemConfig) -> MegamemConfig:
    out = copy.deepcopy(cfg)
    t = out.training
    t.qlora_enabled = t.qlora_rank = t.qlora_alpha = t.qlora_lr = None
    t.progressive = TrunkLoraConfig(new_stack_precision=t.progressive.new_stack_precision)
    return out


def _phased(cfg: MegamemConfig, mode: str, size: int, blocks: int, steps: int) -> MegamemConfig:
    t = cfg.training
    t.mode, t.fusion_mode, t.block_size, t.total_blocks = mode, "frozen", size, blocks
    t.steps_per_phase, t.epochs_per_layer = steps // blocks, None
    return cfg


def arm_configs(base: MegamemConfig, tokens: int, out: str) -> Dict[str, MegamemConfig]:
    """The three arms' configs (each validated, each phase's too: refused before anything trains)."""
    t = base.training
    if t.mode == "full":
        raise ConfigError("the base config trains in one run (training.mode: full): give a progressive schedule "
                          "(training.mode: blockwise | fused | layerwise with training.block_size and "
                          "training.total_blocks, e.g. configs/stackwise_blockwise.yaml)")
    if t.phase is not None:
        raise ConfigError("training.phase is set per phase by tools/progressive.py; remove it from the base config")
    size, blocks, per_step = block_size(t), total_blocks(base), tokens_per_step(base)
    unit = per_step * blocks
    if tokens <= 0 or tokens % unit:
        low = max(tokens, 0) // unit * unit
        nearest = " or ".join(str(v) for v in (low, low + unit) if v > 0)
        raise ConfigError(f"--tokens {tokens}: every arm trains whole steps of {per_step} tokens (batch_size × "
                          f"max_length × gradient_accumulation_steps) and the progressive arms split them into "
                          f"{blocks} equal phases: give a multiple of {unit} (e.g. {nearest})")
    steps = tokens // per_step
    base = copy.deepcopy(base)
    base.training.logging_steps, base.training.num_epochs = 1, None
    base.training.resume_from_checkpoint = base.training.init_from = base.training.init_from_new = None

    full = _without_trunk_lora(base)
    for key in SCHEDULE_KEYS:
        setattr(full.training, key, None)
    full.training.mode, full.training.max_steps, full.training.fusion_mode = "full", steps, "frozen"
    blockwise = _phased(_without_trunk_lora(base), "blockwise", size, blocks, steps)
    fused = _phased(copy.deepcopy(base), "fused", size, blocks, steps)
    fused.training.qlora_enabled = True
    if fused.training.progressive.trunk_strategy == "frozen":  # would contradict qlora_enabled
        fused.training.progressive.trunk_strategy = None
    arms = {"full": full, "blockwise_frozen": blockwise, "fused_lora": fused}
    for name, cfg in arms.items():
        cfg.training.output_dir = os.path.join(out, name)
        problems = validate(cfg)
        if problems:
            raise ConfigError(f"arm {name}: {problems[0]}")
        try:
            for p in range(blocks if cfg.training.mode != "full" else 0):
                phase_config(cfg, p)  # growth and each phase's keys, checked now
        except ConfigError as e:
            raise ConfigError(f"arm {name}: {e}") from None
    return arms


def arm_finished(cfg: MegamemConfig) -> bool:
    last = cfg.training.output_dir if cfg.training.mode == "full" else phase_dir(cfg, total_blocks(cfg) - 1)
    return os.path.isfile(os.path.join(last, "final", "model.safetensors"))


def arm_curves(cfg: MegamemConfig) -> List[Dict[str, Any]]:
    """The arm's runs on one token axis: its phases, or its one run (as phase 0, all layers)."""
    if cfg.training.mode != "full":
        return phase_summaries(cfg)
    s = run_summary(cfg.training.output_dir)
    return [] if s is None else [{"phase": 0, "layers": [0, cfg.model.num_layers - 1], **s}]


def arm_row(name: str, cfg: MegamemConfig, curves: List[Dict[str, Any]], wall_s: Optional[float]) -> Dict[str, Any]:
    """One table row: the last phase's final eval and train loss, totals over the phases."""
    last = curves[-1]
    return {"arm": name, "mode": cfg.training.mode, "phases": len(curves),
            "steps": sum(s["steps"] for s in curves), "tokens": sum(s["tokens"] for s in curves),
            "eval_loss": last["eval_loss"], "eval_ppl": last["eval_ppl"], "train_loss": last["train_loss"],
            "wall_s": wall_s, "step_time_s": sum(s["train_time_s"] for s in curves)}


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """Each row against the full arm: perplexity ratio (exp of the eval-loss difference), wall and step time."""
    ref = next(r for r in rows if r["arm"] == "full")

    def ratio(a, b):
        return None if a is None or not b else a / b

    for r in rows:
        r["ppl_vs_full"] = None if r["eval_loss"] is None or ref["eval_loss"] is None \
            else math.exp(r["eval_loss"] - ref["eval_loss"])
        r["wall_vs_full"] = ratio(r["wall_s"], ref["wall_s"])
        r["step_time_vs_full"] = ratio(r["step_time_s"], ref["step_time_s"])
        r["tokens_vs_full"] = ratio(r["tokens"], ref["tokens"])


COLUMNS = [("arm", "arm", "{}"), ("phases", "phases", "{}"), ("steps", "steps", "{}"), ("tokens", "tokens", "{:,}"),
           ("eval_loss", "eval loss", "{:.4f}"), ("eval_ppl", "eval ppl", "{:.2f}"),
           ("train_loss", "train loss", "{:.4f}"), ("wall_s", "wall s", "{:.1f}"),
           ("step_time_s", "step time s", "{:.2f}"), ("ppl_vs_full", "ppl / full", "{:.3f}"),
           ("wall_vs_full", "wall / full", "{:.2f}"), ("step_time_vs_full", "step time / full", "{:.2f}")]


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    cell = lambda r, k, f: "-" if r.get(k) is None else f.format(r[k])  # noqa: E731
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
