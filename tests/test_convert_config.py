"""tools/convert_config.py: the other trainers' configs as megamem YAML — every key mapped or refused."""
import importlib.util
import os

import pytest
import yaml

from megamem.config import ConfigError, load_config
from megamem.config.migrate import migrate

from conftest import ROOT

PEER_MLA = """
model_config:
  hidden_size: 64
  num_hidden_layers: 2
  num_attention_heads: 4
  intermediate_size: 96
  vocab_size: 512
  max_position_embeddings: 128
  initializer_range: 0.02
  layer_norm_eps: 1e-5
  use_peer: true
  peer_start_layer: 1
  peer_config:
    num_experts: 64
    num_experts_per_tok: 4
    num_heads: 2
    expert_hidden_size: 1
    product_key_dim: [8, 8]
    query_dim: 16
    batch_norm_query: true
    log_expert_usage: true
    log_freq: 10
    usage_threshold: 5.0
  mla_config:
    q_lora_rank: 24
    kv_lora_rank: 16
    qk_rope_head_dim: 8
    v_head_dim: 16
    qk_nope_head_dim: 16
train_config:
  output_dir: "./output"
  per_device_train_batch_size: 16
  gradient_accumulation_steps: 4
  learning_rate: 5e-5
  weight_decay: 0.01
  max_grad_norm: 1.0
  num_train_epochs: 3
  lr_scheduler_type: "cosine"
  warmup_ratio: 0.1
  log_level: "info"
  logging_steps: 100
  save_steps: 1000
  eval_steps: 2000
  seed: 42
  fp16: false
  bf16: false
  tf32: false
  resume_from_checkpoint: null
dataset_config:
  datasets:
    - name: "pile-uncopyrighted"
      path: "monology/pile-uncopyrighted"
      split: "train"
      streaming: true
      weight: 0.7
      text_field: "text"
    - name: "local"
      path: "data/corpus/kjv/train.jsonl"
      split: "train"
      weight: 0.3
      text_field: "text"
  tokenizer_name: "gpt2"
  max_seq_length: 128
wandb_config:
  project: "llm-research"
  name: "lm-training-peer-mla"
"""


def tool():
    spec = importlib.util.spec_from_file_location("convert_config", os.path.join(ROOT, "tools", "convert_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(tmp_path, text, name="src.yaml"):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_peer_mla_layout_maps_every_key(tmp_path, capsys):
    out = str(tmp_path / "mine.yaml")
    assert tool().main([write(tmp_path, PEER_MLA), "--output", out]) == 0
    cfg = load_config(out)
    m, t, d = cfg.model, cfg.training, cfg.data
    assert (m.hidden_dim, m.num_layers, m.num_heads, m.intermediate_dim, m.vocab_size, m.max_seq_len, m.norm_eps) == \
        (64, 2, 4, 96, 512, 128, 1e-5)
    assert (t.batch_size, t.gradient_accumulation_steps, t.learning_rate, t.num_epochs, t.scheduler, t.warmup_ratio,
            t.mixed_precision, t.max_length, t.wandb_project, t.wandb_run_name, t.log_to_wandb) == \
        (16, 4, 5e-5, 3, "cosine", 0.1, "no", 128, "llm-research", "lm-training-peer-mla", True)
    assert m.tokenizer_name == "gpt2" and cfg.memory.vanilla_mode
    assert (m.use_peer, m.peer_start_layer, m.peer_config.num_experts, m.peer_config.product_key_dim,
            m.peer_config.query_dim, m.peer_config.log_freq) == (True, 1, 64, [8, 8], 16, 10)
    assert (m.attention_type, m.mla_config.q_lora_rank, m.mla_config.kv_lora_rank, m.mla_config.qk_rope_head_dim,
            m.mla_config.v_head_dim, m.mla_config.qk_nope_head_dim) == ("mla", 24, 16, 8, 16, 16)
    import torch

    from megamem.model import build_model

    with torch.device("meta"):  # the converted model builds: MLA attention, PEER in layer 1, no memory
        model = build_model(cfg)
    assert type(model.blocks[1].mlp).__name__ == "PEER" and type(model.blocks[0].attn).__name__ != "MultiHeadAttention"
    assert not model.banks
    hub, local = d.datasets
    assert (hub.name, hub.path, hub.streaming, hub.weight) == ("monology/pile-uncopyrighted", None, True, 0.7)
    assert (local.name, local.path, local.weight) == ("local", "data/corpus/kjv/train.jsonl", 0.3)
    printed = capsys.readouterr().out
    assert "PEER + MLA trainer layout" in printed and "note: memory.vanilla_mode: true" in printed
    assert "note: training.mixed_precision: no" in printed


def test_keys_without_meaning_are_refused_together_with_what_to_use(tmp_path, capsys):
    text = PEER_MLA.replace('  project: "llm-research"', "  project: p\n  entity: me")
    src = write(tmp_path, text + "eval_config:\n  evals: [hellaswag, humaneval]\n  evals_registry_path: r/\n")
    out = tmp_path / "mine.yaml"
    with pytest.raises(SystemExit) as e:
        sys_exit(tool().run_cli, lambda: tool().main([src, "--output", str(out)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "eval_config.evals: humaneval executes the generated code" in err[0]
    assert "eval_config.evals_registry_path: OpenAI Evals registries are not read" in err[0]
    assert "wandb_config.entity: set WANDB_ENTITY" in err[0]
    assert not out.exists()
    # leaving them out on purpose converts the rest
    assert tool().main([src, "--output", str(out), "--drop", "eval_config", "wandb_config.entity"]) == 0
    assert load_config(str(out)).training.wandb_project == "p"


def test_eval_config_evals_become_lm_eval_tasks(tmp_path):
    src = write(tmp_path, PEER_MLA + "eval_config:\n  evals: [hellaswag, mmlu, truthfulqa, gsm8k]\n"
                "  eval_batch_size: 16\n")
    out = tmp_path / "mine.yaml"
    assert tool().main([src, "--output", str(out)]) == 0
    ev = load_config(str(out)).evaluation
    assert ev.evals == ["hellaswag", "mmlu", "truthfulqa_mc2", "gsm8k"]
    assert ev.benchmarks == ["perplexity", "lm_eval"] and ev.eval_batch_size == 16


def sys_exit(run_cli, main):
    raise SystemExit(run_cli(main))


@pytest.mark.parametrize("text,problem", [
    ("train_config:\n  fp16: true\n  bf16: true\n", "train_config.fp16 and train_config.bf16 are both true"),
    ("train_config:\n  lr_scheduler_type: polynomial\n", "lr_scheduler_type 'polynomial': megamem has cosine"),
    ("train_config:\n  tf32: true\n", "train_config.tf32: megamem leaves TF32 off"),
    ("train_config:\n  steps_per_epoch: 10\n", "give train_config.max_steps instead"),
    ("model_config:\n  rope_scaling: {type: yarn}\n", "model_config.rope_scaling.type: has no megamem counterpart"),
    ("dataset_config:\n  datasets: [{path: x.jsonl, format: json}]\n", "megamem reads the format from the file"),
])
def test_value_problems(text, problem):
    _, _, problems, _ = migrate(yaml.safe_load(text))
    assert any(problem in p for p in problems), problems


def test_long_context_layout(tmp_path):
    text = """
experiment_name: spiral_small
output_dir: ./outputs/spiral
model:
  pos_encoding: {type: hybrid, irrational: phi, hybrid_K: 32, transition_width: 8}
  attractor: {use_attractor: true, alpha_policy: fixed, alpha_value: 0.95, inject_layers: last_N, N_inject: 2,
              attractor_inject: residual, d_state: 16}
training: {batch_size: 2, learning_rate: 3.0e-4, lr_scheduler_type: linear, warmup_steps: 5, bf16: true, seed: 1}
data: {max_seq_length: 64, dataloader_num_workers: 0}
system: {num_gpus: 1, gradient_checkpointing: true, log_throughput: true, cpu_offload: false, window_size: 16}
evaluation: {benchmarks: [niah, ruler, infinitebench], niah_lengths: [1024, 2048], niah_depths: [0.1, 0.5, 0.9],
             ruler_tasks: [vt, cwe], ruler_max_length: 4096, max_new_tokens: 16, do_sample: false,
             metrics: [accuracy]}
ablation_mode: hybrid_k
ablation_values: [16, 32]
"""
    _, _, problems, _ = migrate(yaml.safe_load(text))
    assert [p.split(":")[0] for p in problems] == ["evaluation.benchmarks", "evaluation.metrics"]
    assert "InfiniteBench needs its data files" in problems[0] and "string_match_all" in problems[1]
    text = text.replace(", infinitebench]", "]").replace("metrics: [accuracy]", "metrics: [string_match_part]")
    custom = text.replace("inject_layers: last_N", "inject_layers: custom")
    assert "give the layer list itself" in migrate(yaml.safe_load(custom))[2][0]
    _, data, problems, _ = migrate(yaml.safe_load(text))
    assert not problems
    out = str(tmp_path / "lc.yaml")
    open(out, "w").write(yaml.safe_dump(data))
    cfg = load_config(out)
    assert (cfg.model.pos_encoding.hybrid_K, cfg.model.pos_encoding.irrational, cfg.model.window_size) == (32, "phi", 16)
    assert (cfg.model.pos_encoding.type, cfg.training.wandb_run_name, cfg.training.scheduler,
            cfg.training.mixed_precision, cfg.training.max_length, cfg.data.num_workers, cfg.training.num_gpus,
            cfg.training.gradient_checkpointing) == ("hybrid", "spiral_small", "linear", "bf16", 64, 0, 1, True)
    e = cfg.evaluation
    assert (e.benchmarks, e.niah_lengths, e.niah_depths, e.ruler_tasks, e.ruler_max_length, e.max_new_tokens,
            e.metrics) == (["niah", "ruler"], [1024, 2048], [0.1, 0.5, 0.9], ["vt", "cwe"], 4096, 16,
                           ["string_match_part"])
    bad = text.replace("ruler_tasks: [vt, cwe]", "ruler_tasks: [counting, multi_hop]")
    open(out, "w").write(yaml.safe_dump(migrate(yaml.safe_load(bad))[1]))
    with pytest.raises(ConfigError, match=r"evaluation.ruler_tasks \['counting', 'multi_hop'\]: valid tasks are"):
        load_config(out)
    a = cfg.model.attractor
    assert (a.use_attractor, a.alpha_policy, a.alpha_value, a.inject_layers, a.N_inject, a.attractor_inject,
            a.d_state) == (True, "fixed", 0.95, "last_N", 2, "residual", 16)
    assert (cfg.evaluation.ablation_mode, cfg.evaluation.ablation_values) == ("hybrid_k", [16, 32])  # tools/ablate.py


def test_stack_wise_layout(tmp_path):
    text = """
model: {vocab_size: 512, d_model: 64, n_layers: 4, n_heads: 4, n_kv_heads: 2, d_ff: 96, attention_mode: causal,
        attention_type: gqa, tie_embeddings: true}
training: {mode: fused, fusion_mode: frozen, total_blocks: 2, block_size: 2, epochs_per_block: 3,
           current_block_lr: 5.0e-4, learning_rate: 5.0e-4, batch_size: 8, max_steps: 100, qlora_enabled: false,
           time_step_masking: true, progressive: {enabled: true, trunk_strategy: qlora}}
"""
    _, _, problems, _ = migrate(yaml.safe_load(text))
    assert problems == []  # every key has a megamem key (LoRA on the trunk, masking, attention_mode)
    # the config itself is refused at load: masking needs attention_mode: bidirectional, and qlora_enabled: false
    # contradicts trunk_strategy: qlora; without both it loads
    drop = ["training.time_step_masking", "training.progressive"]
    _, data, problems, _ = migrate(yaml.safe_load(text), drop=drop)
    assert not problems
    out = str(tmp_path / "sw.yaml")
    open(out, "w").write(yaml.safe_dump(data))
    cfg = load_config(out)
    m, t = cfg.model, cfg.training
    assert (m.hidden_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_dim, m.attention_type,
            m.tie_embeddings) == (64, 4, 4, 2, 96, "gqa", True)
    assert (t.mode, t.fusion_mode, t.total_blocks, t.block_size, t.epochs_per_layer, t.current_block_lr) == \
        ("fused", "frozen", 2, 2, 3, 5.0e-4)
    _, data, problems, _ = migrate({"model": {"d_model": 8, "attention_mode": "bidirectional"}})
    assert not problems and data["model"]["attention_mode"] == "bidirectional"  # masked runs: tests/test_masking.py


def test_a_megamem_config_needs_no_conversion():
    _, _, problems, _ = migrate(yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny_cpu.yaml"))))
    assert problems and "megamem configs need no conversion" in problems[0]


def test_stack_wise_dual_lora_keys(tmp_path):
    """LoRA on the trunk and its precision: the same keys; the guide's progressive.qlora_rank/alpha/enabled are
    training.*, its qlora_configs mapping the list of entries; a 4-bit trunk converts and is refused at run time."""
    text = """
model: {vocab_size: 61, d_model: 32, n_layers: 4, n_heads: 4, n_kv_heads: 2, d_ff: 48, attention_mode: causal}
training: {mode: fused, fusion_mode: frozen, total_blocks: 4, block_size: 1, qlora_lr: 1.0e-5, max_steps: 10,
           quantization_enabled: false,
           progressive: {enabled: true, trunk_strategy: qlora, new_stack_precision: bfloat16, qlora_enabled: true,
                         qlora_strategy: variable, qlora_rank: 16, qlora_alpha: 32, progressive_qlora: true,
                         progressive_qlora_rank: 8, progressive_qlora_alpha: 16,
                         qlora_configs: {0: {rank: 8, alpha: 16}, 2: {rank: 32, alpha: 64}}}}
"""
    _, data, problems, _ = migrate(yaml.safe_load(text))
    assert not problems
    out = str(tmp_path / "sw.yaml")
    open(out, "w").write(yaml.safe_dump(data))
    t = load_config(out, ["--training.mixed_precision", "bf16"]).training
    p = t.progressive
    assert (t.qlora_enabled, t.qlora_rank, t.qlora_alpha, t.qlora_lr, t.quantization_enabled) == (True, 16, 32, 1e-5, False)
    assert (p.enabled, p.trunk_strategy, p.new_stack_precision, p.qlora_strategy, p.progressive_qlora,
            p.progressive_qlora_rank, p.progressive_qlora_alpha) == (True, "qlora", "bfloat16", "variable", True, 8, 16)
    assert [(c.stack, c.rank, c.alpha) for c in p.qlora_configs] == [(0, 8, 16), (2, 32, 64)]
    _, _, problems, _ = migrate(yaml.safe_load(text.replace("qlora_configs: {0: {rank: 8, alpha: 16}",
                                                            "qlora_configs: {0: {rank: 8, dropout: 0.1}")))
    assert problems == ["training.progressive.qlora_configs: qlora_configs must map a stack index to {rank, alpha}"]
