"""Native Llama export only for configs that are exactly Llama (megamem.hf.llama's allow-list).

Every ModelConfig and MemoryConfig field is tried with a non-default value: either the value is on
the allow-list and the Llama export's logits equal megamem's, or the config routes away from Llama
naming that field. A field added later is covered here without editing this file.
"""
import dataclasses
import json
import typing

import pytest
import torch

from megamem.config import AttractorConfig, ConfigError, MemoryConfig, MLAConfig, ModelConfig, PeerConfig, PositionEncodingConfig
from megamem.folders import export_model
from megamem.hf.convert import convert_to_hf
from megamem.hf.llama import (ANY, LLAMA_INERT_MEMORY_FIELDS, LLAMA_MODEL_FIELDS, llama_config,
                              llama_incompatibilities, to_llama_state_dict)
from megamem.model import build_model

from conftest import tiny_config

# valid values for the fields Llama expresses with any value (the tiny config's shapes otherwise)
LLAMA_EXAMPLES = {
    "hidden_dim": 48, "num_heads": 8, "num_kv_heads": 4, "num_layers": 3, "intermediate_dim": 40,
    "vocab_size": 67, "max_seq_len": 32, "rope_theta": 500.0, "attention_dropout": 0.1, "norm_eps": 1e-5,
    "initializer_range": 0.05, "tie_embeddings": True, "tokenizer_name": "some/tokenizer", "bos_token_id": 3,
    "eos_token_id": 4, "pad_token_id": 5, "use_flash_attention": False, "freeze_base_model": False,
}
# non-default values Llama cannot express, for fields whose type allows Llama values besides the default
NON_LLAMA = {"hidden_activation": "gelu", "use_rope": False, "mlp_type": "gelu",
             "pos_encoding": PositionEncodingConfig("learned"), "peer_config": PeerConfig(num_heads=2),
             "mla_config": MLAConfig(kv_lora_rank=8), "attractor": AttractorConfig(use_attractor=True)}
FIELDS = [("model", f.name) for f in dataclasses.fields(ModelConfig)] + \
         [("memory", f.name) for f in dataclasses.fields(MemoryConfig)]


def non_default(section_type, name):
    """A value of the field's type other than its default."""
    f = next(f for f in dataclasses.fields(section_type) if f.name == name)
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    hint = typing.get_type_hints(section_type)[name]
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return next(o for o in options if o != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default * 2 + 1
    if isinstance(default, list) or (default is None and any(typing.get_origin(o) is list for o in options)):
        return ["k_proj"] if default and isinstance(default[0], str) else [0]
    if default is None:
        kind = options[0]
        return {int: 3, float: 0.5, str: "x"}.get(kind, "x")
    return default + "-other"


def variant(section, name):
    cfg = tiny_config("memory.vanilla_mode=true")
    examples = {**LLAMA_EXAMPLES, **NON_LLAMA} if section == "model" else {}
    value = examples[name] if name in examples else non_default(ModelConfig if section == "model" else MemoryConfig, name)
    values = dataclasses.replace(getattr(cfg, section), **{name: value})
    return dataclasses.replace(cfg, **{section: values}), value


def allowed(section, name):
    if section == "memory":
        return name in LLAMA_INERT_MEMORY_FIELDS
    return LLAMA_MODEL_FIELDS.get(name) is ANY


def assert_llama_equals_megamem(cfg):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    hf = LlamaForCausalLM(llama_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_llama_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("section,name", FIELDS, ids=[f"{s}.{n}" for s, n in FIELDS])
def test_every_field_is_llama_with_equal_logits_or_routes_away(section, name):
    cfg, value = variant(section, name)
    problems = llama_incompatibilities(cfg)
    if allowed(section, name):
        assert problems == [], f"{section}.{name}={value!r} is on the allow-list"
        assert_llama_equals_megamem(cfg)
    else:
        assert any(p.startswith(f"{section}.{name} is {value!r} (Llama expresses only") for p in problems), problems
        with pytest.raises(ConfigError, match=rf"cannot be exported as native Llama: .*{section}.{name} is"):
            to_llama_state_dict({}, cfg)


def test_the_allow_list_names_only_real_fields():
    assert set(LLAMA_MODEL_FIELDS) <= {f.name for f in dataclasses.fields(ModelConfig)}
    assert LLAMA_INERT_MEMORY_FIELDS <= {f.name for f in dataclasses.fields(MemoryConfig)}


def test_no_memory_layers_without_vanilla_mode_is_llama():
    cfg = tiny_config("memory.memory_layer_placement=none")
    assert llama_incompatibilities(cfg) == []
    assert_llama_equals_megamem(cfg)


def test_weights_without_a_llama_place_are_refused():
    cfg = tiny_config("memory.vanilla_mode=true")
    state = {**build_model(cfg).state_dict(), "banks.0.memory": torch.zeros(4, 32)}
    with pytest.raises(ConfigError, match=r"weights \['banks.0.memory'\] have no Llama counterpart; export it in "
                                          "the megamem format"):
        to_llama_state_dict(state, cfg)


def test_convert_routes_by_the_allow_list_and_honours_format(tmp_path):
    def export(name, *overrides):
        cfg = tiny_config("memory.vanilla_mode=true", *overrides)
        export_model(build_model(cfg).state_dict(), cfg, None, str(tmp_path / name), 1)
        return str(tmp_path / name)

    def model_type(folder):
        return json.loads(open(f"{folder}/config.json").read())["model_type"]

    llama, dropout = export("llama"), export("dropout", "model.dropout=0.1")
    assert model_type(convert_to_hf(llama, str(tmp_path / "a"))) == "llama"
    assert model_type(convert_to_hf(dropout, str(tmp_path / "b"))) == "megamem"  # not Llama: megamem's format
    assert model_type(convert_to_hf(llama, str(tmp_path / "c"), hf_format="megamem")) == "megamem"
    with pytest.raises(ConfigError, match=r"^--format llama: .*dropout is not exactly a Llama model: model.dropout is "
                                          r"0.1 \(Llama expresses only 0.0\); convert with --format auto"):
        convert_to_hf(dropout, str(tmp_path / "d"), hf_format="llama")
    with pytest.raises(ConfigError, match=r"^--format gguf; valid: auto, llama, deepseek_v3, megamem$"):
        convert_to_hf(llama, str(tmp_path / "d"), hf_format="gguf")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("pos", [
    PositionEncodingConfig("rope", rope_base=500.0),  # a code-built config: the base in pos_encoding, not rope_theta
    PositionEncodingConfig("rope_ntk", rope_base=500.0, ntk_factor=2.0, ntk_original_max_seq_len=16),
    PositionEncodingConfig("rope_ntk", ntk_factor=1.5, ntk_scaling="dynamic", ntk_original_max_seq_len=8),
], ids=["rope_base", "static", "dynamic"])
def test_rope_given_in_pos_encoding_is_llama_with_equal_logits(pos):
    cfg = tiny_config("memory.vanilla_mode=true")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pos_encoding=pos))
    assert llama_incompatibilities(cfg) == []
    assert_llama_equals_megamem(cfg)  # 17 tokens: beyond L0 = 8 for dynamic


@pytest.mark.parametrize("pos", [PositionEncodingConfig("rope", max_seq_len=64), PositionEncodingConfig("rope", ntk_factor=2.0),
                                 PositionEncodingConfig("rope_ntk", irrational="e")])
def test_other_pos_encoding_keys_are_not_llama(pos):
    cfg = tiny_config("memory.vanilla_mode=true")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pos_encoding=pos))
    assert [p for p in llama_incompatibilities(cfg) if p.startswith(f"model.pos_encoding is {pos!r} (Llama expresses "
                                                                      "only type rope, or rope_ntk")]
