"""model.attractor's checks (docs/positions.md): each message names the key and what would be valid."""
from __future__ import annotations

from typing import List

from .aliases import position_type


def validate_attractor(m, problems: List[str]) -> None:
    """Ranges of the attractor keys. On an adapter run (model.base_model_name) the layer and width checks wait for
    the base's config (megamem.adapter.build.check_against_base runs them with the base's depth and width)."""
    a = m.attractor
    if not a.use_attractor:
        return
    if not 0.0 < a.alpha_value < 1.0:
        problems.append(f"model.attractor.alpha_value must be in (0, 1), got {a.alpha_value}")
    if not a.c_value > 0:
        problems.append(f"model.attractor.c_value must be > 0, got {a.c_value}")
    if a.d_state is not None and a.d_state <= 0:
        problems.append(f"model.attractor.d_state must be > 0 or null, got {a.d_state}")
    if m.base_model_name is not None:
        return
    if a.inject_layers == "last_N" and not 0 < a.N_inject <= m.num_layers:
        problems.append(f"model.attractor.N_inject must be in [1, {m.num_layers}] (model.num_layers) "
                        f"for inject_layers: last_N, got {a.N_inject}")
    if isinstance(a.inject_layers, list):
        bad = [i for i in a.inject_layers if not 0 <= i < m.num_layers]
        if bad or not a.inject_layers or len(set(a.inject_layers)) != len(a.inject_layers):
            problems.append(f"model.attractor.inject_layers must list distinct layers in [0, {m.num_layers}), "
                            f"got {a.inject_layers}")
    if m.hidden_dim % 2:
        problems.append(f"model.attractor needs an even model.hidden_dim (the π-spiral e_t), got {m.hidden_dim}")
    if m.max_seq_len >= 2 ** 31:
        problems.append(f"model.attractor: model.max_seq_len = {m.max_seq_len}; the π-spiral e_t is exact below "
                        f"2^31 positions only")


def validate_adapter_attractor(cfg, problems: List[str]) -> None:
    """On an adapter run the attractor's and the spiral or hybrid gate's parameters are the `memory` part: they
    train only with the memory adapter."""
    m, mem = cfg.model, cfg.memory
    if m.base_model_name is None or (mem.use_memory_adapter and not mem.vanilla_mode):
        return
    fix = "set memory.use_memory_adapter: true and vanilla_mode: false, or"
    if m.attractor.use_attractor:
        problems.append("model.attractor.use_attractor on an adapter run trains with the memory adapter (the memory "
                        f"optimizer group): {fix} use_attractor: false")
    if position_type(m) in ("pi_spiral", "hybrid"):
        problems.append(f"model.pos_encoding.type {position_type(m)} on an adapter run (a gated {position_type(m)}) "
                        f"trains with the memory adapter (the memory optimizer group): {fix} pos_encoding.type rope")
