"""Progressive (Stack-Wise style) training: one normal run per phase, chained through training.init_from.

Phase p trains block p (megamem.config.progressive). Its run is the user's config with a few keys
changed (`phase_config`): training.phase, output_dir = OUTPUT/phase_p, the phase's length, and for
p > 0 training.init_from = OUTPUT/phase_{p-1}/final. In `fused` mode the model grows: phase p has
(p + 1) * block_size layers, the new block is declared in training.init_from_new and starts as the
identity (init_from_new_init: identity), so the grown model computes what the previous phase's did.
`run_phases` runs them in order and skips a phase whose final export exists (resumable).
See docs/progressive.md.
"""
from __future__ import annotations

import copy
import os
from typing import Callable, List, Optional, Sequence

import torch

from ..config import ConfigError, MegamemConfig, save_config, validate
from ..config.progressive import block_size, total_blocks
from .run_dir import describe_run
from ..parallel.checkpoint_files import complete_tags


PREEMPTED = 75  # scripts/train.py's exit code after a preemption notice (checkpointed, EX_TEMPFAIL)


class PhasePreempted(Exception):
    """A phase's run stopped on a preemption notice after checkpointing: the schedule resumes on a rerun."""


def phase_dir(cfg: MegamemConfig, p: int) -> str:
    return os.path.join(cfg.training.output_dir, f"phase_{p}")


def phase_finished(cfg: MegamemConfig, p: int) -> bool:
    return os.path.isfile(os.path.join(phase_dir(cfg, p), "final", "model.safetensors"))


def _names(cfg: MegamemConfig) -> List[str]:
    from ..model import build_model

    with torch.device("meta"):
        return list(build_model(cfg).state_dict(keep_vars=True))


def grown_names(before: MegamemConfig, after: MegamemConfig) -> List[str]:
    """init_from_new globs for fused growth: `blocks.i.*` for each whole new layer, other new names as they are.
    A name of the smaller model missing from the grown one (a memory placement that moves with depth) is refused."""
    old, new = set(_names(before)), _names(after)
    lost = sorted(old - set(new))
    if lost:
        raise ConfigError(f"training.mode: fused: the grown model ({after.model.num_layers} layers) lacks {lost[:3]} "
                          "of the smaller one; grow only with memory placements that keep earlier layers' memory "
                          "(all, first_k, every_n, custom, none)")
    added = [n for n in new if n not in old]
    globs: List[str] = []
    for name in added:
        parts = name.split(".")
        whole = parts[0] == "blocks" and not any(n.startswith(f"blocks.{parts[1]}.") for n in old)
        glob = f"blocks.{parts[1]}.*" if whole else name
        if glob not in globs:
            globs.append(glob)
    return globs


def phase_config(cfg: MegamemConfig, p: int, resume: bool = False) -> MegamemConfig:
    """The config of phase p's run (see the module doc)."""
    t = cfg.training
    out = copy.deepcopy(cfg)
    o, size = out.training, block_size(t)
    o.phase, o.block_size, o.total_blocks = p, size, total_blocks(cfg)
    o.output_dir = phase_dir(cfg, p)
    if t.steps_per_phase is not None:
        o.max_steps, o.num_epochs = t.steps_per_phase, None
    if t.epochs_per_layer is not None:
        o.num_epochs = t.epochs_per_layer
    if t.mode == "fused":
        out.model.num_layers = (p + 1) * size
    if p > 0:
        o.init_from = os.path.join(phase_dir(cfg, p - 1), "final")
        if not resume:  # the data stream goes on where phase p-1 stopped (a resumed phase has its own position)
            o.init_data_from = os.path.join(phase_dir(cfg, p - 1), "checkpoints")
        if t.mode == "fused":
            o.init_from_new, o.init_from_new_init = grown_names(phase_config(cfg, p - 1), out), "identity"
    o.resume_from_checkpoint = "latest" if resume else None
    problems = validate(out)
    if problems:
        raise ConfigError(f"phase {p}: {problems[0]}")
    return out


def _resumable(cfg: MegamemConfig, p: int) -> bool:
    """Whether phase p's folder holds an unfinished run to resume (a complete checkpoint); refuses one without."""
    folder = phase_dir(cfg, p)
    if not os.path.isdir(folder) or not describe_run(folder):
        return False
    if complete_tags(os.path.join(folder, "checkpoints")):
        return True
    raise ConfigError(f"{folder} holds an interrupted run without a complete checkpoint ({describe_run(folder)}); "
                      "remove that folder to run the phase again")


def _stop_before(p: int, stop_requested: Callable[[], bool]) -> None:
    if stop_requested():
        raise PhasePreempted(f"a preemption notice came before phase {p} started; rerun the same command to start it")


def run_phases(cfg: MegamemConfig, config_dir: str, command: Callable[[str], Sequence[str]],
               run: Callable[[Sequence[str]], int], log: Callable[[str], None] = print,
               only: Optional[int] = None, check: Optional[Callable[[str], None]] = None,
               stop_requested: Callable[[], bool] = lambda: False) -> List[int]:
    """Run each unfinished phase: write its config into config_dir, `check(config_path)` (raises on what its
    ranks would refuse), `run(command(config_path))` (an exit code). Returns the phases run; a failing phase
    stops the schedule with ConfigError; a preempted one, or `stop_requested()` before a phase, with PhasePreempted."""
    t = cfg.training
    if t.mode == "full":
        raise ConfigError("training.mode is full: nothing to run in phases; use scripts/train.py, or set "
                          "training.mode: layerwise | blockwise | fused")
    if t.phase is not None:
        raise ConfigError("training.phase is set per run by tools/progressive.py; remove it from the config")
    if only is not None and not 0 <= only < total_blocks(cfg):
        raise ConfigError(f"--phase {only}: the schedule has phases 0 to {total_blocks(cfg) - 1}")
    if only and not phase_finished(cfg, only - 1):
        raise ConfigError(f"--phase {only}: phase {only - 1} has not finished ({phase_dir(cfg, only - 1)}/final)")
    ran = []
    for p in range(total_blocks(cfg)):
        if only is not None and p != only:
            continue
        if phase_finished(cfg, p):
            log(f"phase {p}: finished ({phase_dir(cfg, p)}/final), skipped")
            continue
        _stop_before(p, stop_requested)
        phase = phase_config(cfg, p, resume=_resumable(cfg, p))
        path = os.path.join(config_dir, f"phase_{p}.yaml")
        os.makedirs(config_dir, exist_ok=True)
        save_config(phase, path)
        layers = range(p * block_size(t), (p + 1) * block_size(t))
        log(f"phase {p}: layers {layers.start}-{layers.stop - 1} of {phase.model.num_layers}, "
            f"{'resuming' if phase.training.resume_from_checkpoint else 'starting'} → {phase.training.output_dir}")
        if check is not None:
            check(path)
        _stop_before(p, stop_requested)  # (a notice that came during the check)
        code = run(command(path))
        ran.append(p)
        if code == PREEMPTED:
            raise PhasePreempted(f"phase {p} was preempted after a checkpoint; rerun the same command to resume it")
        if code != 0:
            raise ConfigError(f"phase {p} failed (exit code {code}); fix it and rerun: finished phases are skipped")
    return ran
