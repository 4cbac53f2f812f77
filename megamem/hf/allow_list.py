"""Allow-lists for native exports (Llama, DeepSeek-V3): which config fields a transformers class expresses.

A family lists, per config section, the fields it expresses and with which values (ANY: every value;
a Rule: the values its test accepts); a field not listed must keep its default. So a field added to megamem later exports in the megamem
format until a test shows the native class gives megamem's logits with it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List

ANY = "any value"


@dataclasses.dataclass(frozen=True)
class Rule:
    """The values of a field a family expresses when no list can name them (a section with its own rules)."""

    accepts: Callable[[Any], bool]
    words: str  # what it accepts, for messages: "<family> expresses only <words>"

# MemoryConfig fields that change nothing in a model without memory layers (vanilla_mode, or
# memory_layer_placement none): native families have no memory layers, and then these may hold any value.
INERT_MEMORY_FIELDS = {
    "vanilla_mode", "num_memory_tokens", "memory_dim", "memory_num_heads", "memory_num_kv_heads",
    "memory_layer_placement", "memory_layer_k", "memory_layer_n", "memory_layer_indices", "memory_sharing",
    "memory_sharing_k", "memory_block_variant", "memory_dropout", "use_low_rank_memory", "memory_rank",
    "low_rank_mode", "use_low_rank_projections", "projection_rank", "use_chapters", "num_chapters",
    "tokens_per_chapter", "top_k_chapters", "num_shared_chapters", "routed_scaling_factor",
    "routing_strategy_train", "routing_strategy_inference", "use_load_balance_loss", "load_balance_coefficient",
    "use_auxiliary_loss", "auxiliary_loss_coefficient", "use_z_loss", "z_loss_coefficient", "shared_router",
    "rolling_interval", "rolling_window", "token_routing_formulation",
    "sequence_routing_formulation", "sparse_bank_grad", "quantize_memory",
    "memory_quant_bits", "wo_init_zero", "memory_init_std", "memory_gradient_checkpointing", "use_lora",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "use_memory_adapter", "use_both_memory_and_lora",
}


def field_default(section, name: str):
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def differences(label: str, values: Any, allowed: Dict[str, Any], family: str) -> List[str]:
    """One line per field of the dataclass `values` (config section `label`) that `family` cannot express."""
    problems = []
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        ok = allowed.get(f.name, (field_default(values, f.name),))
        if isinstance(ok, Rule):
            if not ok.accepts(value):
                problems.append(f"{label}.{f.name} is {value!r} ({family} expresses only {ok.words})")
        elif ok is not ANY and value not in ok:
            expressible = "no value but its default" if f.name not in allowed else " or ".join(map(repr, ok))
            problems.append(f"{label}.{f.name} is {value!r} ({family} expresses only {expressible})")
    return problems
