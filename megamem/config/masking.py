"""The masked-denoising objective's keys: validation, the mask schedule and which time step a run uses.

Pure config logic (docs/progressive.md#masked-denoising). Time steps t = 0 … T−1 each have a mask
fraction f_t: the explicit `time_step_mask_fractions`, or a schedule from min_mask_fraction (t = 0) to
max_mask_fraction (t = T−1) with p = t/(T−1) and Δ = f_max − f_min:
linear f_min + pΔ, exponential f_min + (e^p − 1)/(e − 1)·Δ, cosine f_min + (1 − cos πp)/2·Δ.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

from .progressive import total_blocks
from .schema import MegamemConfig, ModelConfig, TrainingConfig

DEFAULT_TIME_STEPS, DEFAULT_MIN, DEFAULT_MAX = 12, 0.1, 0.99
SCHEDULES: Dict[str, Callable[[float], float]] = {  # p in [0, 1] → the share of Δ added to f_min
    "linear": lambda p: p,
    "exponential": lambda p: math.expm1(p) / math.expm1(1.0),
    "cosine": lambda p: (1.0 - math.cos(math.pi * p)) / 2.0,
}
SCHEDULE_KEYS = ("min_mask_fraction", "max_mask_fraction", "mask_schedule_type")
MASKING_KEYS = ("num_time_steps", "time_step_mask_fractions", *SCHEDULE_KEYS, "time_step_selection", "mask_token_id")


def num_time_steps(t: TrainingConfig) -> int:
    if t.num_time_steps is not None:
        return t.num_time_steps
    return len(t.time_step_mask_fractions) if t.time_step_mask_fractions else DEFAULT_TIME_STEPS


def mask_fractions(t: TrainingConfig) -> List[float]:
    """f_t for t = 0 … T−1 (float64)."""
    if t.time_step_mask_fractions is not None:
        return [float(f) for f in t.time_step_mask_fractions]
    T = num_time_steps(t)
    lo = DEFAULT_MIN if t.min_mask_fraction is None else t.min_mask_fraction
    hi = DEFAULT_MAX if t.max_mask_fraction is None else t.max_mask_fraction
    share = SCHEDULES[t.mask_schedule_type or "linear"]
    return [lo + share(step / (T - 1) if T > 1 else 0.0) * (hi - lo) for step in range(T)]


def time_step_selection(t: TrainingConfig) -> str:
    """block: the phase's block picks t; batch: t is drawn per batch (uniform over 0 … T−1)."""
    return t.time_step_selection or ("batch" if t.mode == "full" else "block")


def block_time_step(cfg: MegamemConfig) -> int:
    """The step of phase p of P blocks: round(p·(T−1)/(P−1)) (block 0 → t = 0, the last block → t = T−1)."""
    t, blocks, T = cfg.training, total_blocks(cfg), num_time_steps(cfg.training)
    return 0 if blocks <= 1 else round(t.phase * (T - 1) / (blocks - 1))


def causal_only_problem(model: ModelConfig, what: str) -> Optional[str]:
    """A bidirectional model asked for something that needs a causal one (decoding with a KV cache, causal export)."""
    if model.attention_mode == "causal":
        return None
    return (f"model.attention_mode: bidirectional: {what} needs a causal model (each token sees only the tokens "
            "before it); this model was trained with the masked-denoising objective (training.time_step_masking)")


def _model_problems(cfg: MegamemConfig, problems: List[str]) -> None:
    """What bidirectional attention cannot be combined with."""
    m = cfg.model
    if m.attention_mode == "causal":
        return
    from .aliases import position_type

    if not cfg.training.time_step_masking:
        problems.append("model.attention_mode: bidirectional lets every position see the next token, which the causal "
                        "LM loss predicts: set training.time_step_masking: true (masked denoising) or attention_mode: "
                        "causal")
    if m.window_size is not None:
        problems.append("model.window_size: sliding-window attention is causal (keys i − window < j ≤ i); with "
                        "model.attention_mode: bidirectional set window_size: null")
    if m.attractor.use_attractor:
        problems.append("model.attractor.use_attractor: the attractor state reads the tokens before each position "
                        "(causal); with model.attention_mode: bidirectional set use_attractor: false")
    if position_type(m) == "alibi":
        problems.append("model.pos_encoding.type: alibi biases keys by i − j before the query (causal); with "
                        "model.attention_mode: bidirectional use rope, rope_ntk, pi_spiral, hybrid, learned or none")
    if m.base_model_name is not None:
        problems.append("model.attention_mode: bidirectional builds from-scratch models; an adapter run "
                        "(model.base_model_name) keeps its pretrained model's causal attention")
    if cfg.training.eval_long_context:
        problems.append(causal_only_problem(m, "training.eval_long_context (NIAH/RULER generate with a KV cache)"))


def masking_problems(cfg: MegamemConfig, problems: List[str]) -> None:
    """One line per problem, each naming its key."""
    _model_problems(cfg, problems)
    t = cfg.training
    if not t.time_step_masking:
        given = [f"training.{k}" for k in MASKING_KEYS if getattr(t, k) is not None]
        if given:
            problems.append(f"{', '.join(given)} configure the masked-denoising objective; set "
                            "training.time_step_masking: true or remove them")
        return
    if cfg.model.attention_mode != "bidirectional":
        problems.append("training.time_step_masking predicts each masked token from both sides: set "
                        "model.attention_mode: bidirectional")
    fractions = t.time_step_mask_fractions
    if fractions is not None:
        given = [f"training.{k}" for k in SCHEDULE_KEYS if getattr(t, k) is not None]
        if given:
            problems.append(f"training.time_step_mask_fractions and {', '.join(given)} both give the mask fractions; "
                            "keep the list or the schedule")
        if not fractions:
            problems.append("training.time_step_mask_fractions is an empty list; give one fraction per time step")
        elif t.num_time_steps is not None and t.num_time_steps != len(fractions):
            problems.append(f"training.num_time_steps ({t.num_time_steps}) must equal the length of "
                            f"training.time_step_mask_fractions ({len(fractions)}), or be null")
    if t.num_time_steps is not None and t.num_time_steps < 1:
        problems.append(f"training.num_time_steps must be >= 1, got {t.num_time_steps}")
    for key in ("min_mask_fraction", "max_mask_fraction"):
        value = getattr(t, key)
        if value is not None and not 0.0 < value <= 1.0:
            problems.append(f"training.{key} must be in (0, 1], got {value}")
    lo, hi = t.min_mask_fraction, t.max_mask_fraction
    if (DEFAULT_MIN if lo is None else lo) > (DEFAULT_MAX if hi is None else hi):
        problems.append(f"training.min_mask_fraction ({lo if lo is not None else DEFAULT_MIN}) must be <= "
                        f"training.max_mask_fraction ({hi if hi is not None else DEFAULT_MAX})")
    if (len(fractions) == num_time_steps(t) >= 1) if fractions is not None else num_time_steps(t) >= 1:
        bad = [f for f in mask_fractions(t) if not 0.0 < f <= 1.0]
        if bad:
            problems.append(f"training.time_step_mask_fractions {bad}: each fraction must be in (0, 1]")
        elif t.max_length * min(mask_fractions(t)) < 1:
            problems.append(f"mask fraction {min(mask_fractions(t))} masks ⌊{t.max_length}·f⌋ = 0 tokens of a "
                            "training.max_length row: raise it (training.time_step_mask_fractions / min_mask_fraction) "
                            "or max_length")
    if t.time_step_selection == "block" and t.mode == "full":
        problems.append("training.time_step_selection: block picks t from the phase's block; with training.mode: full "
                        "use batch (or null)")
    if t.mask_token_id is not None and not 0 <= t.mask_token_id < cfg.model.vocab_size:
        problems.append(f"training.mask_token_id = {t.mask_token_id} is outside the vocabulary "
                        f"[0, {cfg.model.vocab_size}) (model.vocab_size)")
    elif t.mask_token_id is not None and t.mask_token_id == cfg.model.pad_token_id:
        problems.append(f"training.mask_token_id = {t.mask_token_id} is model.pad_token_id: the model could not tell "
                        "a masked position from padding; use another id")
