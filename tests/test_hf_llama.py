"""A vanilla megamem model exported as native Llama gives the same logits (litgpt-style parity)."""
import pytest
import torch

from megamem.config import ConfigError
from megamem.hf.llama import llama_config, to_llama_state_dict
from megamem.model import build_model

from conftest import tiny_config


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true", "model.num_kv_heads=4", "model.rope_theta=500.0"]])
def test_vanilla_equals_transformers_llama(extra):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("memory.vanilla_mode=true", *extra)
    ours = build_model(cfg).eval()
    hf = LlamaForCausalLM(llama_config(cfg)).eval()
    state = {k: v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(to_llama_state_dict(state, cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
        ref = hf.generate(ids[:, :4], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:, :4], 6), ref)


def test_memory_model_is_not_llama():
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="cannot be exported as native Llama: the model has memory layers"):
        to_llama_state_dict(build_model(cfg).state_dict(), cfg)


def test_convert_export_and_zero3_checkpoint_to_llama_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from dist_utils import run_ranks
    from megamem.hf.convert import convert_to_hf
    from megamem.hf.load import load_exported
    from test_train import ZERO, _fit

    out = tmp_path / "run"
    run_ranks(_fit, str(out), ZERO[3], 2, ("training.max_steps=2", "memory.vanilla_mode=true",
                                          "model.tie_embeddings=true"), world_size=2, tmp_path=tmp_path / "r")
    ours, _, _ = load_exported(str(out / "final"))
    ids = torch.randint(0, 61, (2, 9))
    for source in (out / "final", out / "checkpoints"):  # the export, and the ZeRO-3 partitions merged
        folder = convert_to_hf(str(source), str(tmp_path / f"hf-{source.name}"))
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(hf).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="exists and is not empty; pass --force"):
        convert_to_hf(str(out / "final"), str(tmp_path / "hf-final"))
    assert convert_to_hf(str(out / "final"), str(tmp_path / "hf-final"), dtype="bf16", force=True)
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-final")).dtype == torch.bfloat16


# ------------------------------------------------------------------- rope_ntk as native Llama
NTK = {"static": ["model.pos_encoding.type=rope_ntk", "model.pos_encoding.ntk_factor=4", "model.rope_theta=500.0"],
       "dynamic": ["model.pos_encoding.type=rope_ntk", "model.pos_encoding.ntk_factor=3.3",
                   "model.pos_encoding.ntk_scaling=dynamic", "model.pos_encoding.ntk_original_max_seq_len=48"]}


def ntk_pair(kind):
    """A rope_ntk megamem model (max_seq_len 256) and a fresh transformers Llama with its weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("memory.vanilla_mode=true", "model.max_seq_len=256", "training.max_length=256", *NTK[kind])
    ours = build_model(cfg).eval()
    hf = LlamaForCausalLM(llama_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_llama_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return cfg, ours, hf


def test_ntk_rope_parameters():
    """static: a default rope of base·s^(d/(d−2)), the Python float; dynamic: transformers' own type, L0 its length."""
    _, _, static = ntk_pair("static")
    assert static.config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0 * 4.0 ** (8 / 6)}
    assert static.config.max_position_embeddings == 256
    _, _, dynamic = ntk_pair("dynamic")
    assert dynamic.config.rope_parameters == {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.3}
    assert dynamic.config.max_position_embeddings == 48


@pytest.mark.parametrize("kind", list(NTK))
@pytest.mark.parametrize("length", [17, 48, 49, 120, 256])
def test_ntk_exported_llama_gives_megamem_logits(kind, length):
    """At, and for dynamic far beyond, the trained length L0 = 48 (each length on a fresh transformers model:
    its dynamic rotary module keeps the largest length's base, see docs/positions.md)."""
    _, ours, hf = ntk_pair(kind)
    ids = torch.randint(0, 61, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(NTK))
@pytest.mark.parametrize("prompt", [8, 60])
def test_ntk_exported_llama_generates_megamem_tokens(kind, prompt):
    """Greedy decoding with the KV cache across L0 = 48 (prompt 8) and from beyond it (prompt 60), 120 tokens."""
    _, ours, hf = ntk_pair(kind)
    ids = torch.randint(0, 61, (2, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # an explicit mask: without one transformers masks every prompt token equal to pad_token_id
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=120, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, 120), ref)


def test_transformers_dynamic_rope_keeps_the_longest_base():
    """The documented difference: after a 200-token call, transformers rotates a 100-token call with the base of
    200 (L0 < 100 < 200); megamem, like a fresh transformers model, with the base of 100."""
    _, ours, hf = ntk_pair("dynamic")
    long, short = (torch.randint(0, 61, (1, n), generator=torch.Generator().manual_seed(n)) for n in (200, 100))
    with torch.no_grad():
        fresh = hf(short).logits
        hf(long)
        torch.testing.assert_close(fresh, ours(short).logits, rtol=0, atol=1e-5)
        assert (hf(short).logits - fresh).abs().max() > 1e-4  # ten times the parity tolerance


@pytest.mark.parametrize("over,named", [
    (["model.pos_encoding.type=alibi"], "model.pos_encoding is"),
    (["model.pos_encoding.type=hybrid"], "model.pos_encoding is"),
    (["model.pos_encoding.type=pi_spiral"], "model.pos_encoding is"),
    (["model.pos_encoding.type=none"], "model.pos_encoding is"),
    (NTK["dynamic"] + ["model.window_size=16"], "model.window_size is 16"),
    (NTK["static"] + ["model.attractor.use_attractor=true"], "model.attractor is"),
])
def test_other_positions_are_not_llama(tmp_path, over, named):
    """Every other encoding, and rope_ntk with a window or an attractor, keep megamem's format."""
    import json

    from megamem.folders import export_model
    from megamem.hf.convert import convert_to_hf
    from megamem.hf.llama import llama_incompatibilities

    cfg = tiny_config("memory.vanilla_mode=true", "model.max_seq_len=256", "training.max_length=256", *over)
    assert any(p.startswith(named) for p in llama_incompatibilities(cfg))
    export_model(build_model(cfg).state_dict(), cfg, None, str(tmp_path / "run"), 1)
    with pytest.raises(ConfigError, match=rf"^--format llama: .* is not exactly a Llama model: {named}"):
        convert_to_hf(str(tmp_path / "run"), str(tmp_path / "llama"), hf_format="llama")
    folder = convert_to_hf(str(tmp_path / "run"), str(tmp_path / "auto"))
    assert json.loads(open(f"{folder}/config.json").read())["model_type"] == "megamem"


@pytest.mark.parametrize("kind", list(NTK))
def test_convert_rope_ntk_to_a_llama_folder(tmp_path, kind):
    """auto and --format llama write LlamaForCausalLM; loaded back (config.json), it gives megamem's logits
    beyond L0 and its greedy tokens."""
    import json

    from transformers import AutoModelForCausalLM

    from megamem.folders import export_model
    from megamem.hf.convert import convert_to_hf

    cfg, ours, _ = ntk_pair(kind)
    export_model(ours.state_dict(), cfg, None, str(tmp_path / "run"), 1)
    for fmt in ("auto", "llama"):
        folder = convert_to_hf(str(tmp_path / "run"), str(tmp_path / fmt), hf_format=fmt)
        assert json.loads(open(f"{folder}/config.json").read())["model_type"] == "llama"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "auto")).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 61, (2, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama")).eval()
    with torch.no_grad():
        ref = hf.generate(ids[:, :20], attention_mask=torch.ones_like(ids[:, :20]), max_new_tokens=60,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:, :20], 60), ref)
