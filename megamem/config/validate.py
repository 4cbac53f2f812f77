"""Cross-field checks: each returns a message naming the key and what would be valid."""
from __future__ import annotations

import math
from typing import List

from .aliases import alias_conflicts, position_type
from .layer_selection import peer_placement
from .masking import masking_problems
from .progressive import progressive_problems
from .trunk_lora import trunk_lora_problems
from .schema import RULER_TASKS, MegamemConfig, MLAConfig
from .validate_attractor import validate_adapter_attractor, validate_attractor
from .checks import _fraction, _positive
from .validate_memory import _validate_memory, validate_layout_c


ROTARY = ("rope", "rope_ntk", "hybrid")
SPIRAL = ("pi_spiral", "hybrid")
# what an adapter run can do to its base's positions (megamem/adapter/positions.py, spiral.py, hybrid.py)
ADAPTER_TYPES = ("rope", "rope_ntk", "pi_spiral", "hybrid")
# pos_encoding keys that only one family of encodings reads: given for another type, they are refused
_ONLY_FOR = {"ntk_factor": ("rope_ntk",), "ntk_scaling": ("rope_ntk",), "ntk_original_max_seq_len": ("rope_ntk",),
             "irrational": SPIRAL, "hybrid_K": ("hybrid",), "transition_width": ("hybrid",)}


def _validate_positions(m, problems: List[str]) -> None:
    """model.pos_encoding: keys given for a type that does not read them, and out-of-range values."""
    p, kind = m.pos_encoding, position_type(m)
    for key, types in _ONLY_FOR.items():
        if getattr(p, key) is not None and kind not in types:
            problems.append(f"model.pos_encoding.{key} applies to pos_encoding.type {' / '.join(types)} only "
                            f"(type is {kind})")
    _positive(problems, "model.pos_encoding", p, "rope_base", "max_seq_len", "ntk_original_max_seq_len")
    if p.ntk_factor is not None and not p.ntk_factor >= 1.0:
        problems.append(f"model.pos_encoding.ntk_factor must be >= 1, got {p.ntk_factor}")
    for key in ("hybrid_K", "transition_width"):
        if getattr(p, key) is not None and getattr(p, key) < 0:
            problems.append(f"model.pos_encoding.{key} must be >= 0, got {getattr(p, key)}")
    if m.base_model_name is not None:  # an adapter run keeps its base's attention and RoPE (docs/positions.md)
        if p.type is not None and kind not in ADAPTER_TYPES:
            problems.append(f"model.pos_encoding.type {kind} applies to from-scratch models; an adapter run "
                            f"(model.base_model_name) takes {' / '.join(ADAPTER_TYPES)} (the base keeps its RoPE)")
        given = [f"model.pos_encoding.{key}" for key, types in _ONLY_FOR.items()
                 if getattr(p, key) is not None and not set(types) & set(ADAPTER_TYPES)]
        if given:
            problems.append(f"{', '.join(given)} applies to from-scratch models; an adapter run "
                            f"(model.base_model_name) keeps its pretrained model's positions and attention")
    if kind in SPIRAL and m.hidden_dim % 2:
        problems.append(f"model.pos_encoding.type {kind} needs an even model.hidden_dim, got {m.hidden_dim}")
    if kind in SPIRAL and max(m.max_seq_len, p.max_seq_len or 0) > 2 ** 31:
        problems.append(f"model.max_seq_len = {max(m.max_seq_len, p.max_seq_len or 0)}: pos_encoding.type {kind} "
                        f"computes exact phases for positions below 2^31 only")


def _validate_model(cfg: MegamemConfig, problems: List[str]) -> None:
    m = cfg.model
    _positive(problems, "model", m, "hidden_dim", "num_heads", "num_kv_heads", "num_layers",
              "intermediate_dim", "vocab_size", "max_seq_len", "rope_theta", "norm_eps", "initializer_range",
              "window_size")
    _fraction(problems, "model", m, "dropout", "attention_dropout")
    if m.hidden_dim > 0 and m.num_heads > 0 and m.hidden_dim % m.num_heads:
        problems.append(f"model.hidden_dim ({m.hidden_dim}) must be divisible by model.num_heads ({m.num_heads})")
    elif m.attention_type != "mla" and position_type(m) in ROTARY and m.num_heads > 0 and (m.hidden_dim // m.num_heads) % 2:
        problems.append(f"model.pos_encoding.type {position_type(m)} needs an even head dim; hidden_dim/num_heads = "
                        f"{m.hidden_dim // m.num_heads}")
    problems += alias_conflicts(m)
    _validate_positions(m, problems)
    validate_attractor(m, problems)
    validate_adapter_attractor(cfg, problems)
    _validate_mla(m, problems)
    kv = m.num_kv_heads
    if kv is not None and kv > 0 and m.num_heads > 0 and m.num_heads % kv:
        problems.append(f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({kv})")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tok = getattr(m, name)
        if tok is not None and not 0 <= tok < m.vocab_size:
            problems.append(f"model.{name} = {tok} is outside the vocabulary [0, {m.vocab_size})")


def _validate_peer(cfg: MegamemConfig, problems: List[str]) -> None:
    """PEER keys: placement (one policy, layer_selection.py) and the product-key geometry."""
    m, p = cfg.model, cfg.model.peer_config
    if m.mlp_type == "peer":
        problems.append("model.mlp_type: peer is chosen per layer: set model.use_peer: true and "
                        "model.peer_layer_placement (mlp_type names the MLP of the other layers)")
    if not m.use_peer:
        return
    if m.base_model_name is not None:
        problems.append("model.use_peer builds PEER layers into from-scratch models; adapter runs "
                        "(model.base_model_name) keep the base's MLPs: set use_peer: false")
    n_layers, placement = m.num_layers, peer_placement(m)
    if m.peer_start_layer is not None and m.peer_layer_placement is not None:
        problems.append("model.peer_start_layer and model.peer_layer_placement both place PEER layers; keep one")
    elif m.peer_start_layer is not None and not 0 <= m.peer_start_layer < n_layers:
        problems.append(f"model.peer_start_layer = {m.peer_start_layer} must be in [0, {n_layers}) (model.num_layers)")
    if placement == "none":
        problems.append("model.peer_layer_placement: none selects no layer; set model.use_peer: false instead")
    if placement in ("first_k", "last_k") and m.peer_layer_placement and not 1 <= m.peer_layer_k <= n_layers:
        problems.append(f"model.peer_layer_k = {m.peer_layer_k} must be in [1, {n_layers}] for placement {placement}")
    if placement == "every_n" and not 1 <= m.peer_layer_n <= n_layers:
        problems.append(f"model.peer_layer_n = {m.peer_layer_n} must be in [1, {n_layers}] (every_n: layers n-1, 2n-1, …)")
    idx = m.peer_layer_indices
    if placement == "custom" and not idx:
        problems.append("model.peer_layer_placement is 'custom' but model.peer_layer_indices is empty; give a list")
    elif placement == "custom" and (any(not 0 <= i < n_layers for i in idx) or len(set(idx)) != len(idx)):
        problems.append(f"model.peer_layer_indices {idx} must be distinct layers in 0..{n_layers - 1}")
    elif placement != "custom" and idx is not None:
        problems.append("model.peer_layer_indices is only used with model.peer_layer_placement: custom")
    _positive(problems, "model.peer_config", p, "num_experts", "num_experts_per_tok", "num_heads",
              "expert_hidden_size", "query_dim", "log_freq", "usage_threshold")
    sizes = list(p.product_key_dim)
    if len(sizes) < 2 or any(n < 1 for n in sizes):
        problems.append(f"model.peer_config.product_key_dim {sizes} must list at least 2 sub-key set sizes, each >= 1")
    elif math.prod(sizes) != p.num_experts:
        problems.append(f"model.peer_config.product_key_dim {sizes}: the product {math.prod(sizes)} must equal "
                        f"model.peer_config.num_experts ({p.num_experts})")
    if sizes and p.query_dim > 0 and p.query_dim % len(sizes):
        problems.append(f"model.peer_config.query_dim ({p.query_dim}) must be divisible by the {len(sizes)} "
                        "sub-key sets of product_key_dim (one equal sub-query each)")
    if 0 < p.num_experts < p.num_experts_per_tok:
        problems.append(f"model.peer_config.num_experts_per_tok ({p.num_experts_per_tok}) must be <= "
                        f"num_experts ({p.num_experts}): the product-key candidates hold at most that many experts")


def _validate_mla(m, problems: List[str]) -> None:
    """mla_config is read only by attention_type mla; its rotated width must split into pairs."""
    c = m.mla_config
    if m.attention_type == "mla" and m.window_size is not None:
        problems.append("model.window_size: sliding-window attention is built for attention_type mha; with mla "
                        "set window_size: null")
    if m.attention_type != "mla":
        if c != MLAConfig():
            problems.append(f"model.mla_config is read only with model.attention_type: mla (it is "
                            f"'{m.attention_type}'); remove mla_config or set attention_type: mla")
        return
    _positive(problems, "model.mla_config", c, "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
              "rope_theta")
    if c.q_lora_rank is not None and c.q_lora_rank < 0:
        problems.append(f"model.mla_config.q_lora_rank must be >= 0 (0 or null = no low-rank query), got {c.q_lora_rank}")
    if c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2:
        problems.append(f"model.mla_config.qk_rope_head_dim must be even (RoPE rotates pairs), got {c.qk_rope_head_dim}")
    if m.num_kv_heads is not None and m.num_kv_heads != m.num_heads:
        problems.append(f"model.num_kv_heads ({m.num_kv_heads}) is for mha; attention_type mla shares one latent "
                        "across all heads: remove num_kv_heads")


def _validate_adapter(cfg: MegamemConfig, problems: List[str]) -> None:
    mem, m = cfg.memory, cfg.model
    _positive(problems, "memory", mem, "lora_rank", "lora_alpha")
    _fraction(problems, "memory", mem, "lora_dropout")
    if m.load_in_4bit and m.base_model_name is None:
        problems.append("model.load_in_4bit quantises a pretrained base: set model.base_model_name or turn it off")
    elif m.load_in_4bit and not m.freeze_base_model:
        problems.append("model.load_in_4bit: 4-bit base weights cannot be trained; set model.freeze_base_model: true "
                        "(QLoRA trains LoRA and/or memory on the frozen 4-bit base)")
    if m.base_model_name is None:
        if not mem.use_memory_adapter and not mem.vanilla_mode:
            problems.append("memory.use_memory_adapter: false applies to adapter runs (model.base_model_name); a "
                            "from-scratch model without memory is memory.vanilla_mode: true")
        _lora_modes(cfg, not mem.vanilla_mode, problems)
        return
    memory_on = mem.use_memory_adapter and not mem.vanilla_mode
    _lora_modes(cfg, memory_on, problems)
    lora_on = mem.use_lora or mem.use_both_memory_and_lora
    if not memory_on and not lora_on and m.freeze_base_model:
        problems.append("adapter run with nothing to train (no memory adapter, no LoRA, frozen base): vanilla_mode "
                        "finetunes the base, so set model.freeze_base_model: false (or enable use_memory_adapter "
                        "or use_lora)")
    if cfg.parallel.ep_size > 1:
        problems.append(f"parallel.ep_size = {cfg.parallel.ep_size}: expert-parallel chapter shards are for "
                        "from-scratch models; adapter models (model.base_model_name) keep the bank whole: set ep_size: 1")
    if cfg.data.document_masking:
        problems.append("data.document_masking is not supported for adapter models (HF attention has no "
                        "per-document mask here); set document_masking: false")


def _lora_modes(cfg: MegamemConfig, memory_on: bool, problems: List[str]) -> None:
    """LoRA with or without memory must be said explicitly (training.trainable / frozen also say it)."""
    mem, t = cfg.memory, cfg.training
    explicit = t.trainable is not None or t.frozen is not None
    if mem.use_both_memory_and_lora and not memory_on:
        problems.append("memory.use_both_memory_and_lora needs the memory adapter: set use_memory_adapter: true "
                        "and vanilla_mode: false, or use_both_memory_and_lora: false for LoRA only")
    elif mem.use_lora and memory_on and not mem.use_both_memory_and_lora and not explicit:
        if cfg.model.base_model_name is None:
            problems.append("memory.use_lora on a from-scratch model with memory is ambiguous: set "
                            "use_both_memory_and_lora: true to train memory and LoRA, training.frozen to freeze "
                            "parts of it, or vanilla_mode: true for a model without memory")
        else:
            problems.append("memory.use_lora with memory.use_memory_adapter: true is ambiguous: set "
                            "use_both_memory_and_lora: true to train memory and LoRA, or use_memory_adapter: false "
                            "for LoRA only")


def _validate_evaluation(cfg: MegamemConfig, problems: List[str]) -> None:
    e = cfg.evaluation
    unknown = [t for t in e.ruler_tasks if t not in RULER_TASKS]
    if unknown:
        problems.append(f"evaluation.ruler_tasks {unknown}: valid tasks are {', '.join(RULER_TASKS)}")
    if e.niah_task not in RULER_TASKS[:8]:
        problems.append(f"evaluation.niah_task '{e.niah_task}': use a needle task ({', '.join(RULER_TASKS[:8])})")
    _positive(problems, "evaluation", e, "ruler_max_length", "num_samples", "max_new_tokens", "eval_batch_size",
              "top_k", "profile_decode_tokens")
    for name in ("niah_lengths", "ruler_lengths", "profile_lengths"):
        bad = [n for n in getattr(e, name) or [] if n <= 0]
        if bad:
            problems.append(f"evaluation.{name} {bad}: lengths are token counts > 0")
    bad = [d for d in e.niah_depths if not 0.0 <= d <= 1.0]
    if bad:
        problems.append(f"evaluation.niah_depths {bad}: a depth is a fraction of the haystack, 0 to 1")
    if e.temperature < 0 or (e.top_p is not None and not 0 < e.top_p <= 1):
        problems.append("evaluation.temperature must be >= 0 and evaluation.top_p in (0, 1]")
    if "lm_eval" in e.benchmarks and not e.evals:
        problems.append("evaluation.benchmarks has lm_eval but evaluation.evals names no task (e.g. [arc_easy])")
    if bool(e.ablation_mode) != bool(e.ablation_values):
        problems.append("evaluation.ablation_mode and evaluation.ablation_values go together (the key or named mode "
                        "tools/ablate.py varies, and its values)")
    if cfg.training.eval_long_context and not {"niah", "ruler"} & set(e.benchmarks):
        problems.append("training.eval_long_context: evaluation.benchmarks names neither niah nor ruler")


def _validate_training(cfg: MegamemConfig, problems: List[str]) -> None:
    t = cfg.training
    if t.init_data_from is not None and (t.resume_from_checkpoint is not None or t.init_data_from == "latest"):
        problems.append("training.init_data_from reads the data position of another run's checkpoint (a checkpoints "
                        "folder or one checkpoint); a resumed run has its own: remove one of init_data_from and "
                        "resume_from_checkpoint" if t.resume_from_checkpoint is not None else
                        "training.init_data_from: latest would be this run's own checkpoints; give another run's "
                        "checkpoints folder, or use resume_from_checkpoint: latest")
    if t.init_from_new is not None and (t.init_from is None or not t.init_from_new):
        problems.append("training.init_from_new names parameters absent from training.init_from: give init_from and "
                        "at least one pattern, or remove init_from_new")
    _positive(problems, "training", t, "batch_size", "gradient_accumulation_steps", "num_epochs", "max_steps",
              "max_length", "save_steps", "eval_steps", "save_total_limit", "logging_steps",
              "early_stopping_patience", "memory_lr", "lora_lr", "base_model_lr", "learning_rate",
              "adam_epsilon", "eval_max_batches", "max_nonfinite_steps")
    if t.warmup_steps < 0:
        problems.append(f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.warmup_ratio is not None:
        _fraction(problems, "training", t, "warmup_ratio", closed=True)
    _fraction(problems, "training", t, "adam_beta1", "adam_beta2", "weight_decay")
    _fraction(problems, "training", t, "min_lr_ratio", "decay_start_ratio", closed=True)
    if t.max_grad_norm < 0:
        problems.append(f"training.max_grad_norm must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
    if t.max_length > cfg.model.max_seq_len and cfg.model.base_model_name is None:
        problems.append(f"training.max_length ({t.max_length}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    if t.trainable is not None and t.frozen is not None:
        problems.append("training.trainable and training.frozen both select parameters; keep one (trainable: only "
                        "matches train; frozen: matches are frozen, the rest trains)")
    for key in ("trainable", "frozen"):
        globs = getattr(t, key)
        if globs is not None and not any(g.strip() for g in globs):
            problems.append(f"training.{key} is an empty list; give glob patterns over parameter names such as "
                            "'blocks.*.memory.*' or 'banks.*', or null")
    progressive_problems(cfg, problems)
    trunk_lora_problems(cfg, problems)
    masking_problems(cfg, problems)
    if isinstance(t.text_field, list) and not t.text_field:
        problems.append("training.text_field is an empty list; give a field name or a list of field names")


def _validate_parallel(cfg: MegamemConfig, problems: List[str]) -> None:
    _positive(problems, "parallel", cfg.parallel, "ep_size", "pipeline_stages")
    if cfg.parallel.activation_checkpoint_interval < 0:
        problems.append(f"parallel.activation_checkpoint_interval must be >= 0 (0 = off), "
                        f"got {cfg.parallel.activation_checkpoint_interval}")
    stages, layers = cfg.parallel.pipeline_stages, cfg.model.num_layers
    if stages is not None and stages > 1 and layers > 0 and stages > layers:
        problems.append(f"parallel.pipeline_stages ({stages}) must be at most model.num_layers ({layers}): "
                        "every stage needs at least one block")
    ep, mem = cfg.parallel.ep_size, cfg.memory
    if ep > 1 and not mem.use_chapters:
        problems.append(f"parallel.ep_size = {ep} shards chapters across ranks, "
                        "but memory.use_chapters is false; set ep_size: 1 or enable chapters")
    elif ep > 1:
        if mem.num_chapters % ep:
            problems.append(f"parallel.ep_size ({ep}) must divide memory.num_chapters ({mem.num_chapters}): "
                            "each rank stores num_chapters / ep_size chapters")
        if mem.quantize_memory or (mem.use_low_rank_memory and mem.low_rank_mode == "factorized"):
            problems.append("parallel.ep_size > 1 shards banks stored as trainable rows (full or reduced_dim); "
                            "factorized and quantized banks are not sharded: set ep_size: 1 or use a full bank")


def _validate_data(cfg: MegamemConfig, problems: List[str]) -> None:
    d = cfg.data
    if d.data_mix is not None and d.data_mixes_file is None:
        problems.append(f"data.data_mix '{d.data_mix}' needs data.data_mixes_file (the YAML file that defines the mixes)")
    if d.data_mix is not None and d.datasets:
        problems.append("data.data_mix and data.datasets both name sources; keep one")
    _one_data_source(cfg, problems)
    if not 0.0 <= d.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if d.num_workers not in (0, 1):
        problems.append(f"data.num_workers must be 0 (no prefetch) or 1 (a background thread), got {d.num_workers}")
    if d.prefetch_batches < 1:
        problems.append(f"data.prefetch_batches must be >= 1, got {d.prefetch_batches}")
    if d.shuffle_buffer < 0:
        problems.append(f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
    for i, spec in enumerate(d.datasets):
        label = f"data.datasets entry {i}" + (f" ('{spec.name}')" if spec.name else "")
        if spec.name is None and spec.path is None:
            problems.append(f"{label} needs a name (hub dataset) or a path (local files)")
        if not spec.weight > 0:
            problems.append(f"{label}: weight must be > 0, got {spec.weight}")
        if isinstance(spec.text_field, list) and not spec.text_field:
            problems.append(f"{label}: text_field is an empty list")


def _one_data_source(cfg: MegamemConfig, problems: List[str]) -> None:
    """One source of training data, and no training.dataset_* key that the chosen source would ignore."""
    d, t = cfg.data, cfg.training
    given = [name for name, on in (("data.shards", d.shards is not None), ("data.data_mix", d.data_mix is not None),
                                   ("data.datasets", bool(d.datasets)), ("training.dataset_name", t.dataset_name))
             if on]
    if len(given) > 1 and not (given == ["data.data_mix", "data.datasets"]):  # that pair has its own message
        problems.append(f"{' and '.join(given)} each name training data; keep one (data.shards: pre-tokenized "
                        "shards; data.datasets / data.data_mix: several sources; training.dataset_name: one)")
    if d.datasets or d.data_mix is not None:
        ignored = [f"training.{k} = {getattr(t, k)!r}" for k, default in
                   (("dataset_subset", None), ("dataset_split", "train"), ("eval_split", None))
                   if getattr(t, k) != default]
        if ignored:
            problems.append(f"{', '.join(ignored)} would be ignored: with data.datasets or data.data_mix each entry "
                            "has its own subset / split / eval_split; set them there")
    elif d.shards is not None and t.dataset_subset is not None:
        problems.append("training.dataset_subset would be ignored with data.shards (shards are already tokenized); "
                        "remove it")


def validate(cfg: MegamemConfig) -> List[str]:
    problems: List[str] = []
    _validate_model(cfg, problems)
    _validate_peer(cfg, problems)
    if cfg.model.base_model_name is None:
        _validate_memory(cfg, problems)
    elif not cfg.memory.vanilla_mode:  # widths and depth come from the base, checked when it is built
        _positive(problems, "memory", cfg.memory, "num_memory_tokens", "memory_dim", "memory_num_heads",
                  "memory_num_kv_heads", "memory_layer_k", "memory_layer_n", "memory_sharing_k", "memory_rank",
                  "projection_rank", "memory_init_std")
        _fraction(problems, "memory", cfg.memory, "memory_dropout")
        validate_layout_c(cfg, problems)
    _validate_adapter(cfg, problems)
    _validate_training(cfg, problems)
    _validate_parallel(cfg, problems)
    _validate_data(cfg, problems)
    _validate_evaluation(cfg, problems)
    return problems
