"""Typed config sections. Field names are the YAML keys of the memory-transformer configs.

Defaults describe a small from-scratch memory model; `configs/*.yaml` documents every key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union


@dataclass
class PositionEncodingConfig:
    """`model.pos_encoding`: which positional encoding (megamem.model.positions registry)."""

    type: Optional[str] = None  # rope | rope_ntk | alibi | pi_spiral | hybrid | learned | none; null = model.use_rope's choice (rope by default)
    # rope, rope_ntk, hybrid: the RoPE base; null = model.rope_theta (the two must agree when both are given)
    rope_base: Optional[float] = None
    # the longest sequence; null = model.max_seq_len (the two must agree when both are given)
    max_seq_len: Optional[int] = None
    # rope_ntk only (transformers' rope_scaling "dynamic" / static NTK-aware scaling); docs/positions.md
    ntk_factor: Optional[float] = None  # null = 1.0 (plain RoPE)
    ntk_scaling: Optional[Literal["static", "dynamic"]] = None  # null = static
    ntk_original_max_seq_len: Optional[int] = None  # dynamic: the trained length L0; null = model.max_seq_len
    # pi_spiral and hybrid: the irrational of the Weyl phase 2π·frac(n·α)
    irrational: Optional[Literal["pi", "e", "sqrt2", "phi", "prng"]] = None  # null = pi
    # hybrid only: RoPE below hybrid_K, the spiral above, blended by sigmoid((n - K) / W)
    hybrid_K: Optional[int] = None  # null = 8000
    transition_width: Optional[int] = None  # W; null = 1000; 0 = a hard switch at K


@dataclass
class PeerConfig:
    """`model.peer_config`: PEER expert retrieval (megamem/model/mlp/peer.py; docs/design.md#peer-expert-retrieval)."""

    num_experts: int = 1024  # N: must equal the product of product_key_dim
    num_experts_per_tok: int = 16  # k, per head (a token uses num_heads × k experts)
    num_heads: int = 4  # retrieval heads: own query each, shared sub-keys and experts; outputs summed
    expert_hidden_size: int = 1  # neurons per expert (1 = the paper's single-neuron experts)
    product_key_dim: List[int] = field(default_factory=lambda: [32, 32])  # D >= 2 sub-key set sizes
    query_dim: int = 64  # query width per head, split into D equal sub-queries
    batch_norm_query: bool = True  # BatchNorm over the batch's tokens (the paper); false = LayerNorm per token
    log_expert_usage: bool = True  # count chosen experts; metrics.jsonl gets usage records
    log_freq: int = 100  # steps between usage records
    usage_threshold: float = 5.0  # an expert is hot when its count > usage_threshold × the mean count
    sparse_tables: bool = False  # row-sparse table gradients + lazy AdamW outside the engine (ZeRO-1/2, fp32)


@dataclass
class MLAConfig:
    """`model.mla_config`: multi-head latent attention's widths (read only when model.attention_type is mla)."""

    q_lora_rank: Optional[int] = None  # null or 0 = one q projection; r > 0 = q_a_proj (→ r) → RMSNorm → q_b_proj
    kv_lora_rank: int = 256  # width of the latent c_kv (what decoding caches per token, with the rope key)
    qk_rope_head_dim: int = 32  # rotated part of each query/key head; the key part is one head shared by all (even)
    qk_nope_head_dim: int = 64  # unrotated part of each query/key head (keys from the latent)
    v_head_dim: int = 64  # value width per head (values from the latent)
    rope_theta: Optional[float] = None  # RoPE base of the rotated part; null = model.rope_theta


@dataclass
class AttractorConfig:
    """`model.attractor`: a causal decayed state C_t = α·C_{t−1} + u_t ⊗ e_t read by later tokens (docs/positions.md)."""

    use_attractor: bool = False
    alpha_policy: Literal["exp_c_over_N", "fixed", "learned"] = "exp_c_over_N"  # α = exp(−c_value / model.max_seq_len) | alpha_value | learned from logit(alpha_value)
    alpha_value: float = 0.99  # fixed: α; learned: α at init (0 < α < 1)
    c_value: float = 3.141592653589793  # exp_c_over_N: c (α^max_seq_len = e^−c)
    inject_layers: Union[Literal["all", "last_N"], List[int]] = "all"  # all | last_N (the last N_inject layers) | a list of 0-based layer indices (custom)
    N_inject: int = 4  # last_N: how many layers
    attractor_inject: Literal["cross_attn", "residual", "none"] = "cross_attn"  # how a layer reads C_{t−1}; none = no attractor branch
    d_state: Optional[int] = None  # rows of C (width of u_t); null = model.hidden_dim


@dataclass
class ModelConfig:
    # architecture (from-scratch)
    hidden_dim: int = 768
    num_heads: int = 12
    num_kv_heads: Optional[int] = None  # null = num_heads (multi-head); fewer = grouped-query
    num_layers: int = 12
    intermediate_dim: int = 2048
    vocab_size: int = 32000
    max_seq_len: int = 2048
    # parts, by registry name (megamem.model.attention / mlp / positions)
    attention_type: str = "mha"  # mha (multi-head or grouped-query by num_kv_heads; standard / gqa name it too) | mla
    mla_config: MLAConfig = field(default_factory=MLAConfig)  # multi-head latent attention (attention_type: mla)
    mlp_type: Optional[str] = None  # swiglu | gelu | gelu_tanh; null = hidden_activation's choice (swiglu by default)
    pos_encoding: PositionEncodingConfig = field(default_factory=PositionEncodingConfig)
    attractor: AttractorConfig = field(default_factory=AttractorConfig)  # the causal attractor state branch
    # PEER: product-key expert retrieval replaces the MLP of the selected layers
    use_peer: bool = False
    peer_start_layer: Optional[int] = None  # PEER in every layer from this one on (the seed trainer's key)
    peer_layer_placement: Optional[Literal["middle", "all", "first_k", "last_k", "every_n", "custom", "none"]] = None  # null = middle, or peer_start_layer's
    peer_layer_k: int = 1
    peer_layer_n: int = 2
    peer_layer_indices: Optional[List[int]] = None
    peer_config: PeerConfig = field(default_factory=PeerConfig)
    # positions
    use_rope: Optional[bool] = None  # alias of pos_encoding.type: true = rope, false = learned absolute embeddings
    rope_theta: float = 10000.0
    # attention
    window_size: Optional[int] = None  # sliding-window attention: each token sees itself and the window_size - 1 before it; null = full
    attention_mode: Literal["causal", "bidirectional"] = "causal"  # bidirectional: every token sees the whole row (training.time_step_masking only)
    # regularisation
    dropout: float = 0.0
    attention_dropout: float = 0.0
    # normalisation / activation / init
    norm_eps: float = 1e-6
    use_rms_norm: bool = True
    hidden_activation: Optional[Literal["silu", "gelu", "gelu_tanh"]] = None  # alias of mlp_type: silu = swiglu, gelu(_tanh) = 2-layer GELU MLP
    initializer_range: float = 0.02
    tie_embeddings: bool = False
    # tokenizer
    tokenizer_name: Optional[str] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = 0
    # adapter runs (memory injected into a pretrained Hugging Face model)
    base_model_name: Optional[str] = None
    freeze_base_model: bool = True
    load_in_4bit: bool = False  # QLoRA: base weights in 4-bit NF4 via bitsandbytes (CUDA only; refused on CPU)
    # performance
    use_flash_attention: bool = True  # flash-attn on CUDA when installed, else SDPA


@dataclass
class MemoryConfig:
    vanilla_mode: bool = False  # true = no memory modules or parameters at all (control run)
    # bank
    num_memory_tokens: int = 1024
    memory_dim: Optional[int] = None  # null = hidden_dim
    memory_num_heads: Optional[int] = None  # null = model.num_heads
    memory_num_kv_heads: Optional[int] = None  # null = memory_num_heads
    # placement and sharing
    memory_layer_placement: Literal["all", "first_k", "last_k", "every_n", "custom", "none"] = "all"
    memory_layer_k: int = 5
    memory_layer_n: int = 3
    memory_layer_indices: Optional[List[int]] = None
    memory_sharing: Literal["shared", "per_layer", "every_k_layers"] = "shared"
    memory_sharing_k: int = 2
    memory_block_variant: Literal["A", "B", "C"] = "A"  # C: the memory read takes the place of the layer's MLP
    memory_dropout: float = 0.0
    memory_top_k: Optional[int] = None  # each query head reads its k best-scoring rows only; null = all rows
    memory_qk_norm: bool = False  # RMS-normalised queries/keys with a learned per-head temperature
    memory_qk_temperature: Optional[float] = None  # its initial value; null = sqrt(head_dim)
    # low rank
    use_low_rank_memory: bool = False
    memory_rank: int = 64
    low_rank_mode: Literal["factorized", "reduced_dim"] = "factorized"
    use_low_rank_projections: bool = False
    projection_rank: int = 64
    # chapters
    use_chapters: bool = False
    num_chapters: int = 100
    tokens_per_chapter: Optional[int] = None  # null = num_memory_tokens / num_chapters
    top_k_chapters: int = 20
    num_shared_chapters: int = 0
    routed_scaling_factor: float = 1.0
    routing_strategy_train: Literal["sequence", "token"] = "sequence"
    routing_strategy_inference: Literal["sequence", "rolling", "token"] = "sequence"
    use_load_balance_loss: bool = True
    load_balance_coefficient: float = 0.01
    use_auxiliary_loss: bool = False
    auxiliary_loss_coefficient: float = 0.01
    use_z_loss: bool = False
    z_loss_coefficient: float = 0.001
    shared_router: bool = False  # one router for all memory layers (else one per memory layer)
    rolling_interval: int = 16  # rolling inference: re-route every this many generated tokens
    rolling_window: int = 64  # rolling inference: route on the mean of this many most recent tokens
    token_routing_formulation: Literal["auto", "absorbed", "projected"] = "auto"  # see docs/chapters.md
    sequence_routing_formulation: Literal["auto", "absorbed", "projected"] = "auto"  # see docs/chapters.md
    sparse_bank_grad: bool = False  # chapters: the bank gets a row-sparse gradient (update it with RowSparseAdamW)
    # quantisation
    quantize_memory: bool = False
    memory_quant_bits: Literal[4, 8] = 8
    # initialisation
    wo_init_zero: bool = True
    memory_init_std: float = 0.02
    memory_gradient_checkpointing: bool = False
    # LoRA (adapter runs, and from-scratch runs: lora_targets such as qkv_proj, o_proj, gate_up_proj, down_proj)
    use_lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_memory_adapter: bool = True
    use_both_memory_and_lora: bool = False


@dataclass
class QLoraStackConfig:
    """One entry of `training.progressive.qlora_configs`: stack k's LoRA (qlora_strategy: variable)."""

    stack: int = 0  # k, 0-based (the block index)
    rank: int = 16
    alpha: int = 32


@dataclass
class TrunkLoraConfig:
    """`training.progressive`: Stack-Wise's dual LoRA on the trunk (megamem.config.trunk_lora; docs/progressive.md)."""

    enabled: bool = False  # the source's growth switch: true needs training.mode: fused
    trunk_strategy: Optional[Literal["frozen", "qlora"]] = None  # qlora = LoRA on the trunk; null = training.qlora_enabled
    new_stack_precision: Optional[Literal["full", "half", "bfloat16", "nvfp4"]] = None  # must name mixed_precision's
    qlora_strategy: Optional[Literal["simplified", "progressive", "variable"]] = None  # stack k's rank/alpha; null = simplified
    qlora_rank_pattern: Optional[Literal["constant", "increasing", "decreasing", "linear"]] = None  # progressive; null = constant
    qlora_alpha_pattern: Optional[Literal["constant", "increasing", "decreasing", "linear"]] = None  # progressive; null = constant
    qlora_configs: List[QLoraStackConfig] = field(default_factory=list)  # variable only; others fall back
    progressive_qlora: bool = False  # fused: a second LoRA on every trunk stack (added when a stack is appended)
    progressive_qlora_rank: Optional[int] = None  # null = 8
    progressive_qlora_alpha: Optional[int] = None  # null = 16


@dataclass
class TrainingConfig:
    # learning rates per parameter group
    memory_lr: float = 1e-4
    lora_lr: float = 1e-4
    base_model_lr: float = 1e-5
    learning_rate: Optional[float] = None  # from-scratch runs: the non-memory weights; null = memory_lr
    # which parameters train (megamem.config.trainable): fnmatch globs over parameter names; null = the mode keys decide
    trainable: Optional[List[str]] = None  # only matching parameters train, e.g. ["blocks.*.memory.*", "banks.*"]
    frozen: Optional[List[str]] = None  # matching parameters are frozen, the rest trains (not with trainable)
    training_mode: Literal["pretraining", "instruction_finetuning"] = "pretraining"
    # data
    dataset_name: Optional[str] = None
    dataset_subset: Optional[str] = None
    dataset_split: str = "train"
    eval_split: Optional[str] = None
    text_field: Union[str, List[str]] = "text"
    max_length: int = 1024
    # distribution (DeepSpeed; see ds_configs/)
    # deepspeed: the --deepspeed JSON decides (ZeRO 0-3, pipeline); ddp: whole replicas only (a sharding JSON is refused)
    distributed_strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    num_gpus: Optional[int] = None  # ranks the run expects: a launch with another world size is refused
    # loop
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_epochs: Optional[int] = None
    max_steps: int = 10000
    warmup_steps: int = 100
    warmup_ratio: Optional[float] = None
    # optimiser
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    scheduler: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    min_lr_ratio: float = 0.1
    decay_start_ratio: float = 0.8  # wsd: fraction of the steps before the decay starts
    bank_weight_decay: bool = False  # apply weight_decay to memory banks too
    # precision
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] = "bf16"  # fp8: torchao float8 linears on bf16, CUDA ≥ 8.9
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"  # torchao float8 scaling (mixed_precision: fp8 only)
    save_precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    # checkpoints and evaluation
    save_steps: int = 500
    eval_steps: int = 500
    save_total_limit: Optional[int] = 3
    save_best_model: bool = True
    eval_max_batches: Optional[int] = 50  # cap per evaluation (null = the whole eval split)
    eval_long_context: bool = False  # each evaluation also runs evaluation.benchmarks' niah/ruler (rank 0)
    early_stopping: bool = False
    early_stopping_patience: int = 3
    early_stopping_threshold: float = 0.0
    # logging
    logging_steps: int = 10
    max_nonfinite_steps: int = 5  # consecutive NaN/inf losses (each step skipped) before the run aborts
    log_to_wandb: bool = False
    wandb_project: str = "megamem"
    wandb_run_name: Optional[str] = None
    output_dir: str = "./outputs"
    resume_from_checkpoint: Optional[str] = None
    init_from: Optional[str] = None  # weights only (fresh optimizer, schedule, data): an export folder or any checkpoint
    init_from_new: Optional[List[str]] = None  # growth: globs of parameters this model adds (absent from init_from)
    init_from_new_init: Literal["model", "zeros", "identity"] = "model"  # new: model init, 0, or output layers at 0
    init_data_from: Optional[str] = None  # continue the training data where this checkpoint's run stopped (data only)
    seed: int = 42
    # progressive (phase) training, run by tools/progressive.py: see docs/progressive.md
    mode: Literal["full", "layerwise", "blockwise", "fused"] = "full"  # full: every layer trains in one run
    block_size: Optional[int] = None  # layers per block (layerwise: 1)
    total_blocks: Optional[int] = None  # blocks = phases; total_blocks * block_size = model.num_layers
    steps_per_phase: Optional[int] = None  # each phase's max_steps (null: max_steps / num_epochs per phase)
    epochs_per_layer: Optional[int] = None  # each phase's num_epochs (not with steps_per_phase)
    fusion_mode: Literal["frozen", "trainable"] = "frozen"  # earlier blocks: frozen, or train at learning_rate
    current_block_lr: Optional[float] = None  # the phase's block; null = learning_rate
    phase: Optional[int] = None  # the phase this run trains (set by tools/progressive.py)
    # LoRA on the frozen trunk of a phase, and the trunk's precision (megamem.config.trunk_lora; docs/progressive.md)
    qlora_enabled: Optional[bool] = None  # LoRA on the trunk (blocks < phase); null = progressive.trunk_strategy decides
    qlora_rank: Optional[int] = None  # stack LoRA base rank r (per stack: progressive.qlora_strategy); null = 16
    qlora_alpha: Optional[int] = None  # stack LoRA base alpha (scaling alpha / rank); null = 32
    qlora_lr: Optional[float] = None  # the trunk's LoRA weights (group trunk_lora, no decay); null = lora_lr
    quantization_enabled: bool = False  # hold the trunk at quantization_type (checked against the device)
    quantization_type: Optional[Literal["fp32", "bf16", "fp16", "fp8", "fp4", "nf4", "nvfp4"]] = None
    progressive: TrunkLoraConfig = field(default_factory=TrunkLoraConfig)
    # masked-denoising objective (model.attention_mode: bidirectional): see docs/progressive.md#masked-denoising
    time_step_masking: bool = False  # inputs get the mask token at ⌊S·f_t⌋ positions per row; loss on those only
    num_time_steps: Optional[int] = None  # T (steps t = 0 … T−1); null = len(time_step_mask_fractions), else 12
    time_step_mask_fractions: Optional[List[float]] = None  # f_t per step, each in (0, 1]; null = the schedule below
    min_mask_fraction: Optional[float] = None  # schedule: f_0; null = 0.1
    max_mask_fraction: Optional[float] = None  # schedule: f_{T−1}; null = 0.99
    mask_schedule_type: Optional[Literal["linear", "exponential", "cosine"]] = None  # f_t between them; null = linear
    time_step_selection: Optional[Literal["block", "batch"]] = None  # t per phase's block, or drawn per batch; null = block in progressive modes, batch in full
    mask_token_id: Optional[int] = None  # the id written at masked positions; null = the tokenizer's mask token


@dataclass
class ParallelConfig:
    """Layouts DeepSpeed applies from outside the model (ZeRO stage comes from the DeepSpeed JSON)."""

    ep_size: int = 1  # expert-parallel group size: chapters are sharded across this many ranks
    pipeline_stages: Optional[int] = None  # layers split across this many ranks; null = the DeepSpeed JSON's pipeline.stages (else 1)
    pipeline_partition: Literal["parameters", "uniform"] = "parameters"  # balance stages by parameter count, or by layer count
    activation_checkpoint_interval: int = 0  # pipeline: recompute activations every this many layers in backward (0 = off)


@dataclass
class DatasetSpec:
    """One entry of `data.datasets` (or of a named mix): a hub dataset or local files, and its weight."""

    name: Optional[str] = None  # hub dataset name, or a label for local files
    path: Optional[Union[str, List[str]]] = None  # local file(s) or glob(s): txt, jsonl/json, parquet, csv (+ .gz/.bz2/.zst/.xz)
    subset: Optional[str] = None  # hub config name
    split: str = "train"
    eval_split: Optional[str] = None  # hub split for evaluation
    eval_path: Optional[Union[str, List[str]]] = None  # local evaluation file(s)
    weight: float = 1.0  # relative sampling weight (documents) in a mixture
    text_field: Optional[Union[str, List[str]]] = None  # null = training.text_field
    text_template: Optional[str] = None  # e.g. "Q: {question}\nA: {answer}"; wins over text_field
    streaming: Optional[bool] = None  # null = true for hub datasets, false for local files
    sample_by: Literal["line", "paragraph", "document"] = "line"  # .txt files: what one record is


@dataclass
class DataConfig:
    """Data pipeline keys beyond training.dataset_* (sources, mixtures, packing, shards, workers)."""

    datasets: List[DatasetSpec] = field(default_factory=list)  # several sources mixed by weight
    data_mix: Optional[str] = None  # a named mix from data_mixes_file
    data_mixes_file: Optional[str] = None  # YAML file with `data_mixes: {name: [entries like datasets]}`
    text_template: Optional[str] = None  # default text_template of every source
    document_masking: bool = False  # packed rows carry document_ids; attention stays inside a document
    pack_instructions: bool = True  # instruction_finetuning: pack several examples per row (else one, padded)
    overlong: Literal["truncate", "skip"] = "truncate"  # instruction examples longer than max_length
    bad_records: Literal["error", "skip"] = "error"  # record without text / assistant turn: stop, or skip and count
    shards: Optional[str] = None  # directory of pre-tokenized shards (tools/preprocess_data.py); wins over sources
    shuffle: bool = True  # shuffle documents each epoch (train split)
    shuffle_buffer: int = 1000  # streaming sources: documents in the shuffle buffer
    eval_fraction: float = 0.0  # hold out this fraction of documents (by content hash) when no eval split exists
    num_workers: int = 1  # 0 = build batches in the training thread; 1 = a background prefetch thread
    prefetch_batches: int = 8  # batches the background worker keeps ready
    cache_dir: Optional[str] = None  # datasets cache for local files loaded as map-style; null = HF default


# RULER's synthetic tasks megamem generates (megamem.eval.long_context.tasks builds each of them)
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")


@dataclass
class EvaluationConfig:
    """What scripts/eval.py runs (each key is also its flag: --niah-lengths 1024 4096, ...)."""

    benchmarks: List[Literal["perplexity", "niah", "ruler", "lm_eval", "profile"]] = field(default_factory=lambda: ["perplexity"])
    niah_lengths: List[int] = field(default_factory=lambda: [1024, 2048])  # context lengths in tokens (prompt + answer)
    niah_depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depth fractions
    niah_task: str = "niah_single_1"  # which needle task the grid uses (the RULER niah_* names)
    haystack: Optional[str] = None  # niah filler: noise | corpus (embedded KJV) | a text file; null = the task's own
    ruler_tasks: List[str] = field(default_factory=lambda: ["niah_single_1", "niah_multikey_1", "niah_multivalue",
                                                            "niah_multiquery", "vt", "cwe", "fwe"])
    ruler_max_length: int = 4096  # RULER lengths: this, /2, /4, ... down to 1024 (or ruler_lengths)
    ruler_lengths: Optional[List[int]] = None  # explicit RULER lengths instead
    effective_threshold: float = 85.6  # score that counts as passing for the effective length
    num_samples: int = 10  # samples per (task, length[, depth])
    seed: int = 0  # samples are drawn from this seed
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    do_sample: bool = False
    metrics: List[Literal["string_match_all", "string_match_part"]] = field(default_factory=list)  # also report these
    chat_template: Literal["auto", "on", "off"] = "auto"  # wrap prompts in the tokenizer's chat template
    evals: List[str] = field(default_factory=list)  # lm-evaluation-harness tasks (benchmarks: lm_eval)
    eval_batch_size: int = 1  # lm-eval batch size
    profile_lengths: List[int] = field(default_factory=lambda: [512, 1024, 2048])  # benchmarks: [profile]
    profile_decode_tokens: int = 32  # greedy steps timed after each prefill
    # tools/ablate.py (not scripts/eval.py flags): one run per value of this dotted key or named mode
    ablation_mode: Optional[str] = None
    ablation_values: List[Union[bool, int, float, str]] = field(default_factory=list)


@dataclass
class MegamemConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


SECTIONS = {"model": ModelConfig, "memory": MemoryConfig, "training": TrainingConfig, "parallel": ParallelConfig,
            "data": DataConfig, "evaluation": EvaluationConfig}

# Keys of the earlier single-node trainer that have no meaning here: what to do instead.
RETIRED_KEYS = {
    ("training", "fsdp_sharding_strategy"): "megamem shards with DeepSpeed ZeRO: drop this key and "
    "launch with --deepspeed ds_configs/zero3.json (ZeRO-3 partitions parameters like FSDP FULL_SHARD)",
    ("memory", "memory_layer_custom"): "use memory.memory_layer_indices",
    ("training", "epochs_per_block"): "use training.epochs_per_layer (the epochs of each phase, whatever its size)",
}

# distributed_strategy values of the earlier trainer, and what replaces them.
RETIRED_VALUES = {
    ("training", "distributed_strategy", "fsdp"): "use distributed_strategy: deepspeed with "
    "--deepspeed ds_configs/zero3.json (ZeRO-3 shards parameters, gradients and optimizer state like FSDP)",
}
