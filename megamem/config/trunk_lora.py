"""LoRA on a progressive phase's frozen trunk (Stack-Wise's "dual LoRA") and the trunk's precision: pure config logic.

In phase p the trunk is blocks 0 … p−1 (frozen, fusion_mode: frozen). With LoRA on the trunk each trunk
stack k carries a *stack* LoRA of rank/alpha `stack_rank_alpha(t, k)` and, with progressive.progressive_qlora
(fused mode), a second *progressive* LoRA of progressive_qlora_rank/alpha. Both are peft adapters on the
stack's attention and MLP linear layers (megamem.train.trunk_lora); the phase's export merges them into
plain weights, so the next phase starts from plain weights plus fresh adapters. See docs/progressive.md.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from .schema import MegamemConfig, TrainingConfig

STACK, PROGRESSIVE = "stack", "progressive"  # peft adapter names on a trunk stack's linear layers

# qlora_rank_pattern / qlora_alpha_pattern: stack k's value from the base value v (REFERENCES §3.1)
RANK_PATTERNS = {"constant": lambda v, k: v, "increasing": lambda v, k: v * 2 ** k,
                 "decreasing": lambda v, k: max(1, v // 2 ** k), "linear": lambda v, k: v + 8 * k}
ALPHA_PATTERNS = {"constant": lambda v, k: v, "increasing": lambda v, k: v * 2 ** k,
                  "decreasing": lambda v, k: v // 2 ** k, "linear": lambda v, k: v + 16 * k}

# engine precision (training.mixed_precision) each precision name stands for; megamem trains every stack at it
ENGINE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "full": "no", "bfloat16": "bf16", "half": "fp16"}
# training.quantization_type values a frozen trunk can be held at under an fp32 engine (megamem.train.trunk_precision)
HALF = ("bf16", "fp16")
# training.quantization_type values stored in 4 bits (bitsandbytes, CUDA): the trunk's LoRA base layers, any engine
FOUR_BIT = ("nf4", "fp4")


def _engine_name(mixed_precision: str) -> str:
    return {"no": "fp32"}.get(mixed_precision, mixed_precision)


def held_trunk_type(t: TrainingConfig) -> Optional[str]:
    """The dtype name (bf16 / fp16) a phase's frozen trunk is held at apart from the fp32 engine, or None (the
    trunk is at the engine's precision). Valid configs only (see _precision_problems)."""
    if t.quantization_enabled and t.quantization_type in HALF and t.mixed_precision == "no" and t.mode != "full":
        return t.quantization_type
    return None


def four_bit_type(t: TrainingConfig) -> Optional[str]:
    """nf4 / fp4 when a phase's trunk is stored in 4 bits (megamem.train.trunk_precision), else None."""
    if t.quantization_enabled and t.quantization_type in FOUR_BIT and t.mode != "full":
        return t.quantization_type
    return None


def trunk_lora_on(t: TrainingConfig) -> bool:
    """LoRA on the trunk: training.qlora_enabled, or (when that is null) progressive.trunk_strategy: qlora."""
    return t.qlora_enabled if t.qlora_enabled is not None else t.progressive.trunk_strategy == "qlora"


# the LoRA keys, their defaults when null (null lets a key given without LoRA on the trunk be refused)
DEFAULTS = {"qlora_rank": 16, "qlora_alpha": 32, "progressive.qlora_strategy": "simplified",
            "progressive.qlora_rank_pattern": "constant", "progressive.qlora_alpha_pattern": "constant",
            "progressive.progressive_qlora_rank": 8, "progressive.progressive_qlora_alpha": 16}


def _raw(t: TrainingConfig, key: str):
    """The value as given (null when not), for training.<key> or training.progressive.<name>."""
    if key.startswith("progressive."):
        return getattr(t.progressive, key[len("progressive."):])
    return getattr(t, key)


def _get(t: TrainingConfig, key: str):
    value = _raw(t, key)
    return DEFAULTS[key] if value is None else value


def stack_rank_alpha(t: TrainingConfig, k: int) -> Tuple[int, int]:
    """(rank, alpha) of stack k's stack LoRA under progressive.qlora_strategy."""
    rank, alpha, strategy = _get(t, "qlora_rank"), _get(t, "qlora_alpha"), _get(t, "progressive.qlora_strategy")
    if strategy == "progressive":
        return (RANK_PATTERNS[_get(t, "progressive.qlora_rank_pattern")](rank, k),
                ALPHA_PATTERNS[_get(t, "progressive.qlora_alpha_pattern")](alpha, k))
    if strategy == "variable":
        entry = next((c for c in t.progressive.qlora_configs if c.stack == k), None)
        if entry is not None:
            return entry.rank, entry.alpha
    return rank, alpha


def adapter_rank_alpha(t: TrainingConfig, adapter: str, layer: int) -> Tuple[int, int]:
    """(rank, alpha) of a trunk adapter ('stack' or 'progressive') on model layer `layer`."""
    if adapter == PROGRESSIVE:
        return _get(t, "progressive.progressive_qlora_rank"), _get(t, "progressive.progressive_qlora_alpha")
    return stack_rank_alpha(t, layer // (t.block_size or 1))


def trunk_lora_lr(t: TrainingConfig) -> float:
    return t.qlora_lr if t.qlora_lr is not None else t.lora_lr


def _stacks(cfg: MegamemConfig) -> int:
    t = cfg.training
    return t.total_blocks if t.total_blocks is not None else cfg.model.num_layers


def trunk_lora_problems(cfg: MegamemConfig, problems: List[str]) -> None:
    """One line per problem, each naming its key (config only; the device's are in precision_problem)."""
    t, pr = cfg.training, cfg.training.progressive
    _precision_problems(cfg, problems)
    strategy = pr.trunk_strategy
    if t.qlora_enabled is not None and strategy is not None and t.qlora_enabled != (strategy == "qlora"):
        problems.append(f"training.qlora_enabled: {str(t.qlora_enabled).lower()} contradicts training.progressive."
                        f"trunk_strategy: {pr.trunk_strategy}; keep one of them")
    if pr.enabled and t.mode != "fused":
        problems.append(f"training.progressive.enabled grows the model one stack per phase: set training.mode: fused "
                        f"(it is {t.mode}) or remove it")
    if not trunk_lora_on(t):
        given = [k for k in (*DEFAULTS, "qlora_lr") if _raw(t, k) is not None] + \
            (["progressive.qlora_configs"] if pr.qlora_configs else []) + \
            (["progressive.progressive_qlora"] if pr.progressive_qlora else [])
        if given:
            problems.append(f"training.{given[0]} is read only with LoRA on the trunk: set training.qlora_enabled: "
                            "true (or progressive.trunk_strategy: qlora), or remove it")
        return
    if t.mode == "full":
        problems.append("training.qlora_enabled puts LoRA on a progressive phase's frozen trunk: set training.mode: "
                        "layerwise | blockwise | fused (tools/progressive.py), or use memory.use_lora for a full run")
    elif t.fusion_mode != "frozen":
        problems.append("training.qlora_enabled: with fusion_mode: trainable the trunk trains whole; LoRA on the trunk "
                        "needs training.fusion_mode: frozen")
    elif cfg.memory.use_lora or cfg.memory.use_both_memory_and_lora:
        problems.append("training.qlora_enabled and memory.use_lora both put LoRA on the blocks; keep one")
    elif pr.progressive_qlora and t.mode != "fused":
        problems.append(f"training.progressive.progressive_qlora adds LoRA when a stack is appended: only with "
                        f"training.mode: fused (it is {t.mode})")
    _rank_problems(cfg, problems)


def _rank_problems(cfg: MegamemConfig, problems: List[str]) -> None:
    t, pr = cfg.training, cfg.training.progressive
    strategy = _get(t, "progressive.qlora_strategy")
    for key in DEFAULTS:
        value = _get(t, key)
        if isinstance(value, int) and value <= 0:
            problems.append(f"training.{key} must be > 0, got {value}")
    if t.qlora_lr is not None and t.qlora_lr <= 0:
        problems.append(f"training.qlora_lr must be > 0, got {t.qlora_lr}")
    if strategy == "variable" and not pr.qlora_configs:
        problems.append("training.progressive.qlora_strategy: variable needs qlora_configs ([{stack: 0, rank: 8, "
                        "alpha: 16}, ...]; stacks without an entry use qlora_rank / qlora_alpha)")
    if pr.qlora_configs and strategy != "variable":
        problems.append(f"training.progressive.qlora_configs is read only with qlora_strategy: variable (it is "
                        f"{strategy}); set it or remove qlora_configs")
    for key in ("qlora_rank_pattern", "qlora_alpha_pattern"):
        if getattr(pr, key) is not None and strategy != "progressive":
            problems.append(f"training.progressive.{key} is read only with qlora_strategy: progressive "
                            f"(it is {strategy}); set it or remove {key}")
    seen = set()
    for c in pr.qlora_configs:
        if not 0 <= c.stack < _stacks(cfg) or c.stack in seen:
            problems.append(f"training.progressive.qlora_configs: stack {c.stack} is "
                            f"{'given twice' if c.stack in seen else f'not a stack (0 … {_stacks(cfg) - 1})'}")
        seen.add(c.stack)
    if _get(t, "qlora_rank") > 0 and _get(t, "qlora_alpha") > 0:
        for k in range(_stacks(cfg) - 1):  # the last stack is never part of a trunk
            rank, alpha = stack_rank_alpha(t, k)
            if rank <= 0 or alpha <= 0:
                problems.append(f"training.progressive: stack {k}'s LoRA would have rank {rank}, alpha {alpha} "
                                f"({strategy}); both must be > 0")
                break


def _precision_problems(cfg: MegamemConfig, problems: List[str]) -> None:
    """Precisions megamem holds a stack at: the engine's (training.mixed_precision) for every trained stack; the
    frozen trunk at the engine's, or at bf16/fp16 under an fp32 engine. The 4-bit trunk types are refused by the
    device check (precision_problem), which knows whether CUDA is there."""
    t, pr = cfg.training, cfg.training.progressive
    if pr.new_stack_precision == "nvfp4":
        problems.append("training.progressive.new_stack_precision: nvfp4 needs Blackwell GPUs and a library megamem "
                        "does not use; use full, half or bfloat16 (the stack trains at training.mixed_precision)")
    elif pr.new_stack_precision is not None and ENGINE[pr.new_stack_precision] != t.mixed_precision:
        problems.append(f"training.progressive.new_stack_precision: {pr.new_stack_precision} means training."
                        f"mixed_precision: {ENGINE[pr.new_stack_precision]} (megamem trains every stack at the "
                        f"engine's precision, here {t.mixed_precision}); set that, or remove new_stack_precision")
    if t.quantization_type is not None and not t.quantization_enabled:
        problems.append(f"training.quantization_type: {t.quantization_type} is read only with "
                        "training.quantization_enabled: true")
    if not t.quantization_enabled:
        return
    if t.quantization_type is None:
        problems.append("training.quantization_enabled needs training.quantization_type (fp32, bf16, fp16: the "
                        "engine's precision, or bf16/fp16 under mixed_precision: no; nf4/fp4: 4-bit on CUDA)")
    elif t.quantization_type == "nvfp4":
        problems.append("training.quantization_type: nvfp4 needs Blackwell GPUs and a library megamem does not use; "
                        "set training.quantization_enabled: false")
    elif t.quantization_type == "fp8":
        problems.append("training.quantization_type: fp8 is not a trunk storage megamem has; float8 compute is "
                        "training.mixed_precision: fp8 (CUDA ≥ 8.9, torchao); set training.quantization_enabled: "
                        "false")
    elif t.quantization_type in FOUR_BIT and t.mixed_precision == "fp8":
        problems.append(f"training.quantization_type: {t.quantization_type} cannot be combined with training."
                        "mixed_precision: fp8 (float8 would convert the trunk's 4-bit layers); use bf16")
    elif t.quantization_type in FOUR_BIT or (t.quantization_type in HALF and t.mixed_precision == "no"):
        # a trunk held apart from the engine: half under an fp32 engine, or 4-bit under any
        if t.mode == "full":
            problems.append(f"training.quantization_type: {t.quantization_type} holds a progressive phase's frozen "
                            "trunk: set training.mode: layerwise | blockwise | fused (tools/progressive.py), or "
                            "training.quantization_enabled: false")
        elif t.fusion_mode != "frozen":
            problems.append(f"training.quantization_type: {t.quantization_type}: with fusion_mode: trainable the "
                            f"trunk trains at the engine's {_engine_name(t.mixed_precision)}; a trunk held at "
                            f"{t.quantization_type} needs training.fusion_mode: frozen")
        elif t.quantization_type in FOUR_BIT and not trunk_lora_on(t):
            problems.append(f"training.quantization_type: {t.quantization_type} is a QLoRA trunk: it needs "
                            "training.qlora_enabled: true")
    elif t.quantization_type in ENGINE and ENGINE[t.quantization_type] != t.mixed_precision:
        problems.append(f"training.quantization_type: {t.quantization_type} would hold the trunk apart from a "
                        f"training.mixed_precision: {t.mixed_precision} engine, which casts every weight to its dtype;"
                        " a trunk held apart (bf16 or fp16) needs training.mixed_precision: no, else set "
                        f"training.quantization_type: {_engine_name(t.mixed_precision)} or "
                        "training.quantization_enabled: false")


def precision_problem(cfg: MegamemConfig, on_cuda: bool) -> Optional[str]:
    """The 4-bit trunk (nf4 / fp4) needs CUDA and bitsandbytes: on CPU the honest name of what runs is 'LoRA on a
    frozen trunk', and megamem refuses to call it QLoRA."""
    import importlib.util

    t = cfg.training
    if not (t.quantization_enabled and t.quantization_type in FOUR_BIT):
        return None
    if not on_cuda:
        return (f"training.quantization_type: {t.quantization_type} (a 4-bit QLoRA trunk) needs CUDA and bitsandbytes; "
                "on CPU training.qlora_enabled / trunk_strategy: qlora means LoRA on a full-precision frozen trunk: "
                "set training.quantization_enabled: false (or quantization_type: bf16 with mixed_precision: no for a "
                "half-precision one)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"training.quantization_type: {t.quantization_type} stores the trunk with bitsandbytes, which is not "
                "installed: pip install bitsandbytes (or megamem's gpu extra), or set training.quantization_enabled: "
                "false")
    return None
