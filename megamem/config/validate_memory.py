"""Checks of the memory section: bank, placement, low rank, quantisation, chapters, and how a dense bank is read."""
from __future__ import annotations

from typing import List

from .checks import _fraction, _positive
from .layer_selection import peer_layers, select_layers
from .schema import MegamemConfig


def _validate_memory(cfg: MegamemConfig, problems: List[str]) -> None:
    m, mem = cfg.model, cfg.memory
    if mem.vanilla_mode:
        return
    _positive(problems, "memory", mem, "num_memory_tokens", "memory_dim", "memory_num_heads",
              "memory_num_kv_heads", "memory_layer_k", "memory_layer_n", "memory_sharing_k",
              "memory_rank", "projection_rank", "memory_init_std")
    _fraction(problems, "memory", mem, "memory_dropout")
    validate_memory_read(cfg, problems)
    heads = mem.memory_num_heads or m.num_heads
    kv_heads = mem.memory_num_kv_heads or heads
    if heads > 0 and m.hidden_dim % heads:
        problems.append(f"model.hidden_dim ({m.hidden_dim}) must be divisible by memory.memory_num_heads ({heads})")
    if kv_heads > 0 and heads % kv_heads:
        problems.append(f"memory.memory_num_heads ({heads}) must be divisible by memory.memory_num_kv_heads ({kv_heads})")
    placement, n_layers = mem.memory_layer_placement, m.num_layers
    if placement == "every_n" and mem.memory_layer_n > n_layers:
        problems.append(f"memory.memory_layer_n = {mem.memory_layer_n} selects no layer of {n_layers} (every_n reads "
                        f"layers n-1, 2n-1, …): use 1..{n_layers}, or memory.vanilla_mode: true for no memory")
    if placement in ("first_k", "last_k") and not 1 <= mem.memory_layer_k <= n_layers:
        problems.append(f"memory.memory_layer_k = {mem.memory_layer_k} must be in [1, {n_layers}] "
                        f"(model.num_layers) for placement {placement}")
    if placement == "custom":
        idx = mem.memory_layer_indices
        if not idx:
            problems.append("memory.memory_layer_placement is 'custom' but memory.memory_layer_indices is empty; "
                            "give a list such as [0, 5]")
        else:
            bad = [i for i in idx if not 0 <= i < n_layers]
            if bad:
                problems.append(f"memory.memory_layer_indices {bad} out of range: layers are 0..{n_layers - 1}")
            if len(set(idx)) != len(idx):
                problems.append(f"memory.memory_layer_indices {idx} has repeated layers")
    elif mem.memory_layer_indices is not None:
        problems.append(f"memory.memory_layer_indices is only used with memory_layer_placement: custom "
                        f"(placement is '{placement}'); remove it or set placement to custom")
    mem_dim = mem.memory_dim or m.hidden_dim
    if mem.use_low_rank_memory and mem.memory_rank > mem_dim:
        problems.append(f"memory.memory_rank ({mem.memory_rank}) must be <= the memory dim ({mem_dim})")
    if mem.use_low_rank_projections:
        limit = min(m.hidden_dim, mem.memory_rank if _reduced(cfg) else mem_dim)
        if mem.projection_rank > limit:
            problems.append(f"memory.projection_rank ({mem.projection_rank}) must be <= {limit} "
                            f"(the smaller of hidden_dim and the bank dim)")
    if mem.quantize_memory and mem.use_low_rank_memory and mem.low_rank_mode == "factorized":
        problems.append("memory.quantize_memory works on banks stored as rows (full or reduced_dim); "
                        "set memory.low_rank_mode: reduced_dim or turn quantize_memory off")
    bank_dim = mem.memory_rank if _reduced(cfg) else mem_dim
    if mem.quantize_memory and mem.memory_quant_bits == 4 and bank_dim % 2:
        problems.append(f"memory.memory_quant_bits: 4 packs two values per byte and needs an even bank dim, got {bank_dim}")
    _validate_chapters(cfg, problems)
    validate_layout_c(cfg, problems)


def validate_layout_c(cfg: MegamemConfig, problems: List[str]) -> None:
    """Layout C removes the MLP of the layers that read memory: only from-scratch blocks have one to remove."""
    m, mem = cfg.model, cfg.memory
    if mem.memory_block_variant != "C":
        return
    if m.base_model_name is not None:
        problems.append("memory.memory_block_variant: C replaces a block's MLP; adapter runs (model.base_model_name) "
                        "keep the base's MLPs: use A or B")
    elif m.use_peer:
        read = select_layers(mem.memory_layer_placement, m.num_layers, mem.memory_layer_k, mem.memory_layer_n,
                             mem.memory_layer_indices)
        both = sorted(set(read) & set(peer_layers(m)))
        if both:
            problems.append(f"memory.memory_block_variant: C replaces the MLP of layers {both}, where model.use_peer "
                            f"puts PEER: place memory and PEER on different layers, or use layout A or B")


def _reduced(cfg: MegamemConfig) -> bool:
    return cfg.memory.use_low_rank_memory and cfg.memory.low_rank_mode == "reduced_dim"


def _validate_chapters(cfg: MegamemConfig, problems: List[str]) -> None:
    mem = cfg.memory
    if not mem.use_chapters:
        return
    _positive(problems, "memory", mem, "num_chapters", "tokens_per_chapter", "top_k_chapters")
    if mem.top_k_chapters > mem.num_chapters:
        problems.append(f"memory.top_k_chapters ({mem.top_k_chapters}) must be <= memory.num_chapters ({mem.num_chapters})")
    if not 0 <= mem.num_shared_chapters < mem.num_chapters:
        problems.append(f"memory.num_shared_chapters ({mem.num_shared_chapters}) must be in [0, num_chapters)")
    elif mem.num_chapters - mem.num_shared_chapters < mem.top_k_chapters <= mem.num_chapters:
        problems.append(f"memory.top_k_chapters ({mem.top_k_chapters}) must be <= num_chapters - num_shared_chapters "
                        f"({mem.num_chapters - mem.num_shared_chapters}): shared chapters are read anyway, not routed")
    _positive(problems, "memory", mem, "rolling_interval", "rolling_window", "routed_scaling_factor")
    if mem.sparse_bank_grad and (mem.quantize_memory or (mem.use_low_rank_memory and mem.low_rank_mode == "factorized")):
        problems.append("memory.sparse_bank_grad needs a bank stored as trainable rows (full or reduced_dim); "
                        "factorized and quantized banks get dense gradients: set sparse_bank_grad: false")
    tpc = mem.tokens_per_chapter
    if tpc is None and mem.num_chapters > 0 and mem.num_memory_tokens % mem.num_chapters:
        problems.append(f"memory.num_memory_tokens ({mem.num_memory_tokens}) is not divisible by "
                        f"memory.num_chapters ({mem.num_chapters}); pick a divisor or set tokens_per_chapter")
    elif tpc is not None and tpc * mem.num_chapters != mem.num_memory_tokens:
        problems.append(f"memory.tokens_per_chapter ({tpc}) × num_chapters ({mem.num_chapters}) must equal "
                        f"num_memory_tokens ({mem.num_memory_tokens})")


def validate_memory_read(cfg: MegamemConfig, problems: List[str]) -> None:
    mem = cfg.memory
    if mem.memory_top_k is not None:
        if mem.memory_top_k < 1:
            problems.append(f"memory.memory_top_k must be a positive number of rows (or null: every row), "
                            f"got {mem.memory_top_k}")
        elif mem.memory_top_k > mem.num_memory_tokens:
            problems.append(f"memory.memory_top_k ({mem.memory_top_k}) exceeds the bank's rows "
                            f"(memory.num_memory_tokens = {mem.num_memory_tokens}): use at most that, or null")
    if mem.memory_qk_temperature is not None:
        if not mem.memory_qk_norm:
            problems.append("memory.memory_qk_temperature is the initial temperature of memory_qk_norm: set "
                            "memory.memory_qk_norm: true, or remove it")
        elif not mem.memory_qk_temperature > 0:
            problems.append(f"memory.memory_qk_temperature must be > 0, got {mem.memory_qk_temperature}")
    if mem.use_chapters and (mem.memory_top_k is not None or mem.memory_qk_norm):
        problems.append("memory.memory_top_k / memory_qk_norm read a dense bank; chapters already read only their "
                        "routed rows (top_k_chapters): remove them, or set memory.use_chapters: false")


def memory_problems(cfg: MegamemConfig) -> List[str]:
    """Memory checks that depend on the model's widths and depth (adapters: run against the base's config)."""
    problems: List[str] = []
    _validate_memory(cfg, problems)
    return problems
