"""Memory adapters on HF models: parity with the unmodified base, generation, modes, LoRA vs peft, errors."""
import copy

import pytest
import torch

from adapter_utils import FAMILY_CONFIGS, VOCAB, adapter_config, saved_base

from megamem.adapter import build_adapter_model, load_adapter, save_adapter
from megamem.config import ConfigError
from megamem.train.optim import parameter_groups

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomise_outputs(model):
    """Non-zero memory outputs, so the memory path really changes the logits."""
    for branch in model.branches.values():
        for layer in branch.output_layers():
            torch.nn.init.normal_(layer.weight, std=0.3)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("variant", ["A", "B"])
def test_zero_init_memory_equals_base_logits_and_generation(tmp_path, family, variant):
    path, base = saved_base(tmp_path, family)
    sharing = "per_layer" if variant == "B" else "shared"
    model = build_adapter_model(adapter_config(path, f"memory.memory_block_variant={variant}",
                                               f"memory.memory_sharing={sharing}"), seed=0).eval()
    assert model.memory_layers == [0, 1, 2] and len(model.banks) == (3 if variant == "B" else 1)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)
    expected = base.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(model.generate(IDS, 6), expected)
    _randomise_outputs(model)
    with torch.no_grad():
        assert (model(IDS).logits - base(IDS).logits).abs().max() > 1e-3  # the hooks really are in the path


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("placement", ["every_n", "custom"])
def test_cached_generation_with_memory_matches_full_recompute(tmp_path, placement):
    path, _ = saved_base(tmp_path, "qwen2")
    extra = ["memory.memory_layer_n=2"] if placement == "every_n" else ["memory.memory_layer_indices=[0, 2]"]
    model = build_adapter_model(adapter_config(path, f"memory.memory_layer_placement={placement}", *extra,
                                               "memory.memory_sharing=per_layer"), seed=0).eval()
    _randomise_outputs(model)
    calls = []
    for bank in model.banks:
        bank.register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(IDS, 8)
    assert len(calls) == len(model.banks)  # banks (and memory K/V) computed once per generation, not per step
    assert torch.equal(out, _greedy_without_cache(model, IDS, 8))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


MODES = {
    "memory": ([], lambda n: n.startswith(("banks.", "branches."))),
    "lora": (["memory.use_lora=true", "memory.use_memory_adapter=false"], lambda n: "lora_" in n),
    "both": (["memory.use_both_memory_and_lora=true"], lambda n: "lora_" in n or n.startswith(("banks.", "branches."))),
    "vanilla": (["memory.vanilla_mode=true", "model.freeze_base_model=false"], lambda n: n.startswith("base.")),
    "memory+base": (["model.freeze_base_model=false"], lambda n: True),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_trainable_parameters_and_groups_per_mode(tmp_path, mode):
    path, base = saved_base(tmp_path)
    overrides, expected = MODES[mode]
    cfg = adapter_config(path, *overrides, "memory.lora_targets=[q_proj, v_proj, down_proj]",
                         "training.memory_lr=0.01", "training.lora_lr=0.002", "training.base_model_lr=0.0003")
    model = build_adapter_model(cfg, seed=0)
    names = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == {n for n in names if expected(n)} != set()
    has_memory, has_lora = any(n.startswith("banks.") for n in names), any("lora_" in n for n in names)
    assert has_memory == (mode in ("memory", "both", "memory+base"))
    assert has_lora == (mode in ("lora", "both"))
    if has_lora:  # every target got LoRA, memory cross-attention's q_proj/v_proj did not
        assert {n.split(".")[5] for n in names if "lora_A" in n} == {"q_proj", "v_proj", "down_proj"}
        assert not any("lora_" in n for n in names if n.startswith("branches."))
    groups = parameter_groups(model, cfg.training)
    lrs = {g["name"].replace("_no_decay", ""): g["lr"] for g in groups}
    assert lrs == {k: v for k, v in {"memory": 0.01, "lora": 0.002, "base": 0.0003}.items()
                   if k in {("memory" if n.startswith(("banks", "branches")) else "lora" if "lora_" in n else "base")
                            for n in _trainable(model)}}
    grouped = {n for g in groups for n in g["param_names"]}
    assert grouped == _trainable(model)  # frozen parameters are in no group
    with torch.no_grad():  # every mode starts exactly as the base model (LoRA B = 0, memory W_o = 0)
        assert torch.equal(model.eval()(IDS).logits, base(IDS).logits)


def test_lora_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    path, base = saved_base(tmp_path)
    cfg = adapter_config(path, "memory.use_lora=true", "memory.use_memory_adapter=false", "memory.lora_rank=4",
                         "memory.lora_alpha=8", "memory.lora_targets=[q_proj, o_proj]")
    model = build_adapter_model(cfg, seed=0).eval()
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    ours = dict(model.base.named_parameters())
    for name, p in reference.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(ours[name.removeprefix("base_model.model.")].data, std=0.2)
            p.data.copy_(ours[name.removeprefix("base_model.model.")].data)
    with torch.no_grad():
        got, want = model(IDS).logits, reference.eval()(IDS).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and not torch.allclose(got, base(IDS).logits, atol=1e-3)


def test_save_load_roundtrip_and_mismatched_base_refused(tmp_path):
    path, base = saved_base(tmp_path)
    cfg = adapter_config(path, "memory.use_both_memory_and_lora=true", "memory.memory_sharing=per_layer")
    model = build_adapter_model(cfg, seed=0).eval()
    _randomise_outputs(model)
    for p in model.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_adapter(model, cfg, str(tmp_path / "ad"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    assert all(k.startswith(("banks.", "branches.")) or "lora_" in k for k in saved)  # no base weights
    loaded, _, _ = load_adapter(str(tmp_path / "ad"))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    other, _ = saved_base(tmp_path, "llama", seed=1, layers=4)
    with pytest.raises(ConfigError, match="was trained on base .* has a different config.json"):
        load_adapter(str(tmp_path / "ad"), base_model_name=other)
    twin, _ = saved_base(tmp_path, "llama", seed=2)  # same architecture and config.json, other weights
    with pytest.raises(ConfigError, match=r"the weights of .* differ \(same config.json, other weights"):
        load_adapter(str(tmp_path / "ad"), base_model_name=twin)


@pytest.mark.parametrize("overrides, message", [
    (["memory.use_lora=true"], r"use_lora with memory.use_memory_adapter: true is ambiguous"),
    (["memory.use_memory_adapter=false"], r"nothing to train .* model.freeze_base_model: false"),
    (["memory.vanilla_mode=true"], r"nothing to train"),
    (["memory.use_both_memory_and_lora=true", "memory.vanilla_mode=true"], r"use_both_memory_and_lora needs"),
    (["model.load_in_4bit=true", "model.freeze_base_model=false"], r"4-bit base weights cannot be trained"),
])
def test_bad_adapter_configs_refused_at_load(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        adapter_config(str(tmp_path), *overrides)


@pytest.mark.parametrize("overrides, message", [
    (["memory.memory_layer_placement=custom", "memory.memory_layer_indices=[1, 7]"],
     r"memory_layer_indices \[7\] out of range: layers are 0..2"),
    (["memory.memory_num_heads=5"], r"hidden_dim \(32\) must be divisible by memory.memory_num_heads \(5\)"),
    (["memory.use_lora=true", "memory.use_memory_adapter=false", "memory.lora_targets=[query]"],
     r"lora_targets \['query'\] name no module .* 'q_proj'"),
    (["model.load_in_4bit=true", "memory.use_lora=true", "memory.use_memory_adapter=false"],
     r"load_in_4bit needs a CUDA GPU .* set model.load_in_4bit: false"),
])
def test_bad_adapter_configs_refused_against_the_base(tmp_path, overrides, message):
    if "load_in_4bit=true" in overrides[0] and torch.cuda.is_available():
        pytest.skip("CUDA present: 4-bit loading is allowed here")
    path, _ = saved_base(tmp_path)
    with pytest.raises(ConfigError, match=message):
        build_adapter_model(adapter_config(path, *overrides))


def test_unsupported_family_names_the_registry(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB)).save_pretrained(tmp_path / "g")
    with pytest.raises(ConfigError, match=r"'gpt2' has no memory-injection support; supported: llama, mistral, "
                                          r"qwen2, qwen3 \(megamem.adapter.register_family"):
        build_adapter_model(adapter_config(str(tmp_path / "g")))
