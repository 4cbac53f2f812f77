"""Native DeepSeek-V3 export only for configs that are exactly DeepSeek-V3 (megamem.hf.deepseek_v3's allow-list).

Every ModelConfig, MLAConfig and MemoryConfig field is tried with a non-default value on a vanilla MLA
model: either the value is on the allow-list and DeepSeek-V3's logits equal megamem's, or the config
routes away from DeepSeek-V3 naming that field. A field added later is covered without editing this file.
"""
import dataclasses

import pytest
import torch

from megamem.config import AttractorConfig, ConfigError, MemoryConfig, MLAConfig, ModelConfig, PeerConfig, PositionEncodingConfig
from megamem.hf.deepseek_v3 import (ANY, DEEPSEEK_V3_INERT_MEMORY_FIELDS, DEEPSEEK_V3_MLA_FIELDS,
                                    DEEPSEEK_V3_MODEL_FIELDS, deepseek_v3_config, deepseek_v3_incompatibilities,
                                    to_deepseek_v3_state_dict)
from megamem.model import build_model

from conftest import tiny_config
from test_llama_allow_list import non_default
from test_mla import MLA

# valid values for the fields DeepSeek-V3 expresses with any value (the tiny MLA config's shapes otherwise)
EXAMPLES = {
    "model": {"hidden_dim": 48, "num_heads": 8, "num_kv_heads": 4, "num_layers": 3, "intermediate_dim": 40,
              "vocab_size": 67, "max_seq_len": 32, "rope_theta": 500.0, "attention_dropout": 0.1,
              "initializer_range": 0.05, "tie_embeddings": True, "tokenizer_name": "some/tokenizer",
              "bos_token_id": 3, "eos_token_id": 4, "pad_token_id": 5, "use_flash_attention": False,
              "freeze_base_model": False,
              "mla_config": MLAConfig(q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6,
                                      v_head_dim=14, rope_theta=50.0),
              # values DeepSeek-V3 cannot express, for fields whose type allows DeepSeek-V3 values besides the default
              "attention_type": "mha", "hidden_activation": "gelu", "use_rope": False, "mlp_type": "gelu",
              "pos_encoding": PositionEncodingConfig("learned"), "peer_config": PeerConfig(num_heads=2),
              "attractor": AttractorConfig(use_attractor=True)},
    "model.mla_config": {"q_lora_rank": 16, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 6,
                         "v_head_dim": 14, "rope_theta": 50.0},
    "memory": {},
}
SECTIONS = {"model": (ModelConfig, DEEPSEEK_V3_MODEL_FIELDS), "model.mla_config": (MLAConfig, DEEPSEEK_V3_MLA_FIELDS),
            "memory": (MemoryConfig, dict.fromkeys(DEEPSEEK_V3_INERT_MEMORY_FIELDS, ANY))}
FIELDS = [(s, f.name) for s, (kind, _) in SECTIONS.items() for f in dataclasses.fields(kind)]


def variant(section, name):
    cfg = tiny_config(*MLA, "memory.vanilla_mode=true")
    value = EXAMPLES[section][name] if name in EXAMPLES[section] else non_default(SECTIONS[section][0], name)
    if section == "model.mla_config":
        mla = dataclasses.replace(cfg.model.mla_config, **{name: value})
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mla_config=mla)), value
    values = dataclasses.replace(getattr(cfg, section), **{name: value})
    return dataclasses.replace(cfg, **{section: values}), value


def assert_deepseek_v3_equals_megamem(cfg):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    with torch.no_grad():  # random norm weights: swapped norms would show
        for p in ours.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    hf = DeepseekV3ForCausalLM(deepseek_v3_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_deepseek_v3_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    norms = [m for m in hf.modules() if type(m).__name__ == "DeepseekV3RMSNorm"]
    assert norms and all(m.variance_epsilon == cfg.model.norm_eps for m in norms)  # every norm, q/kv latents too
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("section,name", FIELDS, ids=[f"{s}.{n}" for s, n in FIELDS])
def test_every_field_is_deepseek_v3_with_equal_logits_or_routes_away(section, name):
    cfg, value = variant(section, name)
    problems = deepseek_v3_incompatibilities(cfg)
    if SECTIONS[section][1].get(name) is ANY:
        assert problems == [], f"{section}.{name}={value!r} is on the allow-list"
        assert_deepseek_v3_equals_megamem(cfg)
    else:
        assert any(p.startswith(f"{section}.{name} is {value!r} (DeepSeek-V3 expresses only") for p in problems), \
            problems
        with pytest.raises(ConfigError, match=rf"cannot be exported as native DeepSeek-V3: .*{section}.{name} is"):
            to_deepseek_v3_state_dict({}, cfg)


def test_the_allow_list_names_only_real_fields():
    for kind, allowed in SECTIONS.values():
        assert set(allowed) <= {f.name for f in dataclasses.fields(kind)}


def test_no_memory_layers_without_vanilla_mode_is_deepseek_v3():
    cfg = tiny_config(*MLA, "memory.memory_layer_placement=none")
    assert deepseek_v3_incompatibilities(cfg) == []
    assert_deepseek_v3_equals_megamem(cfg)


def test_latent_norms_keep_eps_1e6_whatever_rms_norm_eps_says():
    """Why model.norm_eps must be 1e-6: DeepSeek-V3 builds q_a_layernorm and kv_a_layernorm with their default eps."""
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_config(*MLA, "memory.vanilla_mode=true", "model.mla_config.q_lora_rank=16")
    config = deepseek_v3_config(cfg)
    config.rms_norm_eps = 1e-5
    attn = DeepseekV3ForCausalLM(config).model.layers[0].self_attn
    assert attn.q_a_layernorm.variance_epsilon == attn.kv_a_layernorm.variance_epsilon == 1e-6
    assert any(p.startswith("model.norm_eps is 1e-05 (DeepSeek-V3 expresses only 1e-06)")
               for p in deepseek_v3_incompatibilities(tiny_config(*MLA, "memory.vanilla_mode=true",
                                                                  "model.norm_eps=1e-5")))
