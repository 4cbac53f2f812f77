"""Progressive (phase) training keys: validation and which layers a phase trains. Pure config logic.

training.mode layerwise / blockwise / fused cuts model.num_layers into total_blocks blocks of
block_size layers; phase p trains block p (layers p*block_size … (p+1)*block_size - 1). One run
trains one phase (training.phase, set by tools/progressive.py); see docs/progressive.md.
"""
from __future__ import annotations

from typing import List, Optional

from .schema import MegamemConfig, TrainingConfig

SCHEDULE_KEYS = ("block_size", "total_blocks", "steps_per_phase", "epochs_per_layer", "current_block_lr", "phase")


def block_size(t: TrainingConfig) -> int:
    return 1 if t.mode == "layerwise" and t.block_size is None else t.block_size


def total_blocks(cfg: MegamemConfig) -> int:
    """Phases of the schedule: total_blocks, or (layerwise without it) one per layer of the full model."""
    t = cfg.training
    if t.total_blocks is not None:
        return t.total_blocks
    return cfg.model.num_layers if t.phase is None else -1  # a layerwise phase run states total_blocks (the tool does)


def current_layers(t: TrainingConfig) -> Optional[range]:
    """The layers of the block this run trains; None outside a phase run."""
    if t.mode == "full" or t.phase is None:
        return None
    size = block_size(t)
    return range(t.phase * size, (t.phase + 1) * size)


def frozen_blocks(t: TrainingConfig, num_layers: int) -> Optional[List[str]]:
    """Globs of the layers a phase run freezes: later blocks, and earlier ones under fusion_mode: frozen."""
    layers = current_layers(t)
    if layers is None:
        return None
    first = 0 if t.fusion_mode == "frozen" else layers.start
    return [f"blocks.{i}.*" for i in range(first, num_layers) if i not in layers]


def progressive_problems(cfg: MegamemConfig, problems: List[str]) -> None:
    """One line per problem, each naming its key."""
    t, layers = cfg.training, cfg.model.num_layers
    if t.mode == "full":
        for key in SCHEDULE_KEYS:
            if getattr(t, key) is not None:
                problems.append(f"training.{key} is set but training.mode is full (every layer trains at once); "
                                "set training.mode: layerwise | blockwise | fused, or remove the key")
        return
    for key in ("block_size", "total_blocks", "steps_per_phase", "epochs_per_layer", "current_block_lr"):
        value = getattr(t, key)
        if value is not None and value <= 0:
            problems.append(f"training.{key} must be > 0, got {value}")
    if t.phase is not None and t.phase < 0:
        problems.append(f"training.phase must be >= 0, got {t.phase}")
    if t.mode == "layerwise" and t.block_size not in (None, 1):
        problems.append(f"training.block_size = {t.block_size}: layerwise trains one layer per phase (block_size 1); "
                        "use mode: blockwise for larger blocks")
    if t.mode in ("blockwise", "fused") and (t.block_size is None or t.total_blocks is None):
        problems.append(f"training.mode: {t.mode} needs training.block_size and training.total_blocks "
                        f"(total_blocks * block_size = model.num_layers = {layers})")
    elif t.mode != "layerwise" or t.total_blocks is not None:
        size, blocks = block_size(t), t.total_blocks if t.total_blocks is not None else layers
        # a fused phase run has the depth of its phase: phase + 1 blocks
        depth = blocks * size if t.mode != "fused" or t.phase is None else (t.phase + 1) * size
        if size > 0 and blocks > 0 and depth != layers:
            what = f"(phase + 1) * block_size = {depth}" if depth != blocks * size else \
                f"training.total_blocks * training.block_size = {blocks} * {size}"
            problems.append(f"{what} must equal model.num_layers ({layers})")
        if t.phase is not None and t.phase >= blocks > 0:
            problems.append(f"training.phase {t.phase} is past the last block (total_blocks = {blocks})")
    if t.steps_per_phase is not None and t.epochs_per_layer is not None:
        problems.append("training.steps_per_phase and training.epochs_per_layer both size the phases; keep one")
    if cfg.model.base_model_name is not None:
        problems.append(f"training.mode: {t.mode} trains a from-scratch model's blocks; adapter runs "
                        "(model.base_model_name) use mode: full")
    for key in ("trainable", "frozen"):
        if getattr(t, key) is not None:
            problems.append(f"training.{key}: with training.mode: {t.mode} the phase decides what trains "
                            "(training.fusion_mode); remove it")
    if t.phase is None:
        for key in ("init_from", "init_from_new", "resume_from_checkpoint", "init_data_from"):
            if getattr(t, key) is not None:
                problems.append(f"training.{key}: with training.mode: {t.mode} each phase's run sets it "
                                "(tools/progressive.py); remove it")


def run_problem(cfg: MegamemConfig) -> Optional[str]:
    """A progressive config given to scripts/train.py directly (not one phase of it)."""
    t = cfg.training
    if t.mode != "full" and t.phase is None:
        return (f"training.mode: {t.mode} trains one phase per run: run python tools/progressive.py --config "
                "CONFIG (or set training.phase for one phase)")
    return None
