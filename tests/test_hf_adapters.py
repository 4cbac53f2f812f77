"""Adapter runs exported to Hugging Face folders: merged LoRA, and base + adapter."""
import os
import shutil

import pytest
import torch

from adapter_utils import VOCAB, adapter_config, saved_base
from test_adapter import _randomise_outputs

from megamem.adapter import build_adapter_model, save_adapter
from megamem.config import ConfigError
from megamem.hf.convert import convert_to_hf
from megamem.hf.load import load_exported

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
LORA = ("memory.use_lora=true", "memory.use_memory_adapter=false", "memory.lora_rank=4", "memory.lora_alpha=8",
        "memory.lora_targets=[q_proj, o_proj, down_proj]")


def trained(tmp_path, *overrides):
    path, base = saved_base(tmp_path)
    cfg = adapter_config(path, *overrides)
    model = build_adapter_model(cfg, seed=0).eval()
    if model.memory_layers:
        _randomise_outputs(model)
    for p in model.lora_parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_adapter(model, cfg, str(tmp_path / "final"))
    return model, base


def test_merged_lora_is_a_plain_model_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model, base = trained(tmp_path, *LORA)
    folder = convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf"), merge_lora=True)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in hf.named_parameters())
    with torch.no_grad():
        want = model(IDS).logits
        assert (hf(IDS).logits - want).abs().max() <= 1e-5
        assert (want - base(IDS).logits).abs().max() > 1e-3  # the LoRA deltas matter
    assert torch.equal(hf.generate(IDS[:, :3], max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0),
                       model.generate(IDS[:, :3], 5))


def test_memory_adapter_exports_base_plus_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    model, base = trained(tmp_path, "memory.use_both_memory_and_lora=true")
    with pytest.raises(ConfigError, match=r"has memory adapters \(or an attractor / spiral or hybrid gate\), which cannot be merged"):
        convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf"), merge_lora=True)
    folder = convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf"))
    assert {"adapter.safetensors", "adapter.json"} <= set(os.listdir(folder)) and "config.json" not in os.listdir(folder)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(os.path.join(folder, "base")))
    shutil.rmtree(tmp_path / "llama-0")  # the base it was trained on is gone: the folder is enough
    with pytest.raises(Exception, match="config.json"):  # transformers alone would drop the memory: it refuses
        AutoModelForCausalLM.from_pretrained(folder)
    loaded, _, _ = load_exported(folder)  # megamem: base + memory + LoRA, from this folder alone
    with torch.no_grad():
        assert (loaded(IDS).logits - model(IDS).logits).abs().max() <= 1e-6
        assert (loaded(IDS).logits - base(IDS).logits).abs().max() > 1e-3  # memory and LoRA are in it


def test_a_finetuned_base_converts_to_its_trained_weights(tmp_path):
    """vanilla_mode with the base trained: the folder holds the trained base, loadable by transformers alone."""
    from transformers import AutoModelForCausalLM

    path, base = saved_base(tmp_path)
    cfg = adapter_config(path, "memory.vanilla_mode=true", "model.freeze_base_model=false")
    model = build_adapter_model(cfg, seed=0).eval()
    with torch.no_grad():
        for p in model.base.parameters():
            p.add_(0.05 * torch.randn_like(p))  # "training"
    save_adapter(model, cfg, str(tmp_path / "final"))
    folder = convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - model(IDS).logits).abs().max() <= 1e-5
        assert (hf(IDS).logits - base(IDS).logits).abs().max() > 1e-2  # not the untrained original
