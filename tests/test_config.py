import glob
import os
import textwrap

import pytest

from megamem.config import ConfigError, config_to_dict, load_config, save_config

from conftest import ROOT


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.hidden_dim % cfg.model.num_heads == 0


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.memory.memory_layer_placement == "all" and cfg.training.optimizer == "adamw"


def test_yaml_values_and_types(tmp_path):
    path = write(tmp_path, """
        model: {hidden_dim: 64, num_heads: 4}
        memory: {num_memory_tokens: 32, memory_layer_placement: custom, memory_layer_indices: [0, 3]}
        training: {memory_lr: 1e-4, mixed_precision: no, text_field: [question, answer]}
    """)
    cfg = load_config(path)
    assert cfg.model.hidden_dim == 64
    assert cfg.memory.memory_layer_indices == [0, 3]
    assert cfg.training.memory_lr == 1e-4 and isinstance(cfg.training.memory_lr, float)  # YAML reads 1e-4 as str
    assert cfg.training.mixed_precision == "no"  # YAML 1.1 reads `no` as false
    assert cfg.training.text_field == ["question", "answer"]


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, "model: {hidden_dim: 64, num_heads: 4}\n")
    cfg = load_config(path, ["--memory.num_memory_tokens", "2048", "--model.dropout=0.1",
                             "--memory.memory_block_variant", "B", "--training.text_field", "[a, b]",
                             "--memory.memory_dim", "null"])
    assert cfg.memory.num_memory_tokens == 2048
    assert cfg.model.dropout == 0.1
    assert cfg.memory.memory_block_variant == "B"
    assert cfg.training.text_field == ["a", "b"]
    assert cfg.memory.memory_dim is None


def test_override_validates_after_applying(tmp_path):
    path = write(tmp_path, "model: {hidden_dim: 64, num_heads: 4}\n")
    with pytest.raises(ConfigError, match=r"model.hidden_dim \(64\) must be divisible by model.num_heads \(5\)"):
        load_config(path, ["--model.num_heads", "5"])


def test_save_roundtrip(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "base_small.yaml"), ["--memory.memory_sharing", "per_layer"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, str(out))
    again = load_config(str(out))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert not list(tmp_path.glob("*.tmp.*"))


BAD_CONFIGS = [
    # (yaml text, overrides, expected message fragment)
    ("memory: {num_memory_token: 10}", [], r"unknown key 'memory.num_memory_token' \(did you mean 'num_memory_tokens'\?\)"),
    ("optim: {lr: 1}", [], r"unknown section 'optim'; valid sections: model, memory, training, parallel"),
    ("model: {hidden_dim: big}", [], r"model.hidden_dim = 'big' has the wrong type: expected integer"),
    ("model: {num_layers: true}", [], r"model.num_layers = True has the wrong type: expected integer"),
    ("memory: {memory_layer_placement: middle}", [],
     r"memory.memory_layer_placement = 'middle' has the wrong type: expected one of 'all', 'first_k'"),
    ("model: {hidden_dim: 100, num_heads: 12}", [], r"model.hidden_dim \(100\) must be divisible by model.num_heads \(12\)"),
    ("model: {num_heads: 12, num_kv_heads: 5}", [], r"model.num_heads \(12\) must be divisible by model.num_kv_heads \(5\)"),
    ("memory: {memory_layer_placement: custom, memory_layer_indices: [0, 12]}", [],
     r"memory.memory_layer_indices \[12\] out of range: layers are 0..11"),
    ("memory: {memory_layer_placement: custom}", [], r"memory_layer_indices is empty"),
    ("memory: {memory_layer_placement: last_k, memory_layer_k: 13}", [], r"memory.memory_layer_k = 13 must be in \[1, 12\]"),
    ("memory: {use_chapters: true, num_chapters: 8, num_memory_tokens: 64, top_k_chapters: 9}", [],
     r"memory.top_k_chapters \(9\) must be <= memory.num_chapters \(8\)"),
    ("memory: {use_chapters: true, num_chapters: 7, num_memory_tokens: 64, top_k_chapters: 2}", [],
     r"num_memory_tokens \(64\) is not divisible by memory.num_chapters \(7\)"),
    ("memory: {use_chapters: true, num_chapters: 8, num_memory_tokens: 64, top_k_chapters: 8, num_shared_chapters: 2}",
     [], r"memory.top_k_chapters \(8\) must be <= num_chapters - num_shared_chapters \(6\)"),
    ("memory: {use_chapters: true, num_chapters: 8, num_memory_tokens: 64, top_k_chapters: 2, rolling_interval: 0}",
     [], r"memory.rolling_interval must be > 0, got 0"),
    ("memory: {use_chapters: true, num_chapters: 6, num_memory_tokens: 60, top_k_chapters: 2}\nparallel: {ep_size: 4}",
     [], r"parallel.ep_size \(4\) must divide memory.num_chapters \(6\)"),
    ("memory: {use_chapters: true, num_chapters: 8, num_memory_tokens: 64, top_k_chapters: 2, quantize_memory: true}"
     "\nparallel: {ep_size: 2}", [], r"factorized and quantized banks are not sharded"),
    ("memory: {token_routing_formulation: fast}", [], r"token_routing_formulation = 'fast' has the wrong type"),
    ("memory: {use_low_rank_memory: true, memory_rank: 1024}", [], r"memory.memory_rank \(1024\) must be <= the memory dim \(768\)"),
    ("memory: {use_low_rank_projections: true, projection_rank: 4096}", [], r"memory.projection_rank \(4096\) must be <= 768"),
    ("memory: {quantize_memory: true, use_low_rank_memory: true}", [], r"quantize_memory works on banks stored as rows"),
    ("memory: {memory_quant_bits: 6}", [], r"memory.memory_quant_bits = 6 has the wrong type: expected one of 4, 8"),
    ("memory: {use_lora: true}", [], r"memory.use_lora on a from-scratch model with memory is ambiguous"),
    ("training: {trainable: ['banks.*'], frozen: ['blocks.*']}", [], r"training.trainable and training.frozen both"),
    ("training: {frozen: []}", [], r"training.frozen is an empty list"),
    ("training: {distributed_strategy: fsdp}", [], r"'fsdp' is not supported: .*ds_configs/zero3.json"),
    ("training: {fsdp_sharding_strategy: FULL_SHARD}", [], r"training.fsdp_sharding_strategy is not supported"),
    ("training: {max_length: 4096}", [], r"training.max_length \(4096\) exceeds model.max_seq_len \(2048\)"),
    ("model: {eos_token_id: 32000}", [], r"model.eos_token_id = 32000 is outside the vocabulary \[0, 32000\)"),
    ("training: {warmup_ratio: 1.5}", [], r"training.warmup_ratio must be in \[0, 1\], got 1.5"),
    ("model: {dropout: 1.0}", [], r"model.dropout must be in \[0, 1\), got 1.0"),
    ("parallel: {ep_size: 2}", [], r"parallel.ep_size = 2 shards chapters across ranks, but memory.use_chapters is false"),
    ("[1, 2]", [], r"the top level must be a mapping with sections model, memory, training, parallel"),
    ("model: [1, 2]", [], r"section 'model' must be a mapping of keys, got list"),
    ("model: {hidden_dim: 64", [], r"not valid YAML"),
    ("{}", ["--trainer.lr", "1"], r"override --trainer.lr: unknown section 'trainer'"),
    ("{}", ["--memory.num_memory_tokens"], r"override '--memory.num_memory_tokens' needs a value"),
    ("{}", ["--memory.num_memory_tokens", "many"], r"override --memory.num_memory_tokens: memory.num_memory_tokens = 'many'"),
    ("{}", ["extra"], r"unrecognised argument 'extra'"),
]


@pytest.mark.parametrize("text,overrides,message", BAD_CONFIGS, ids=[m[:40] for _, _, m in BAD_CONFIGS])
def test_bad_config_has_specific_message(tmp_path, text, overrides, message):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, overrides)
    if not overrides:
        assert str(err.value).startswith(path), "the message names the file"


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /nope.yaml"):
        load_config("/nope.yaml")


@pytest.mark.parametrize("name", ["base_small", "tiny_cpu", "recall_tiny"])
def test_shipped_memory_configs_use_the_memory_recipe(name):
    """The recipe the fact-recall benchmark chose (docs/diagnostics.md#the-recipe) is what the from-scratch memory
    configs ship: every second layer reads the bank (layout A, the read starting at zero), sharp reads, the memory
    at ≥ 3x the learning rate of the rest."""
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    m, t = cfg.memory, cfg.training
    assert (m.memory_block_variant, m.memory_layer_placement, m.memory_layer_n) == ("A", "every_n", 2)
    assert (m.memory_top_k, m.memory_qk_norm, m.memory_qk_temperature) == (32, True, 128)
    assert (m.memory_init_std, m.wo_init_zero, m.vanilla_mode) == (1.0, True, False)
    assert t.learning_rate is not None and t.memory_lr >= 3 * t.learning_rate
