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
