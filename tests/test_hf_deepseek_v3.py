"""A vanilla MLA megamem model exported as native DeepSeek-V3 (no remote code) gives megamem's logits and
greedy tokens; models DeepSeek-V3 cannot express (memory, PEER) are refused by --format deepseek_v3 and
keep megamem's format under auto."""
import importlib.util
import json
import os
import re

import pytest
import torch

from megamem.cli import run_cli
from megamem.config import ConfigError
from megamem.folders import export_model
from megamem.hf.convert import convert_to_hf
from megamem.hf.deepseek_v3 import deepseek_v3_config, to_deepseek_v3_state_dict
from megamem.model import build_model

from conftest import ROOT, tiny_config
from test_mla import MEMORY, MLA

VARIANTS = {
    "plain-q": (),
    "low-rank-q": ("model.mla_config.q_lora_rank=16",),
    # q_lora_rank 0 is one q_proj too; a tied head; a rope base of its own (large angles: the rope order matters)
    "q-rank-0-tied-theta-50": ("model.mla_config.q_lora_rank=0", "model.tie_embeddings=true",
                               "model.mla_config.rope_theta=50"),
}
PEER = ("model.use_peer=true", "model.peer_config.product_key_dim=[4, 4]", "model.peer_config.num_experts=16",
        "model.peer_config.num_experts_per_tok=3", "model.peer_config.num_heads=2", "model.peer_config.query_dim=8")


def convert_cli():
    spec = importlib.util.spec_from_file_location("convert_to_hf", os.path.join(ROOT, "tools", "convert_to_hf.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main


def mla_model(*overrides, seed=0):
    """A tiny MLA model whose norm weights are random too (all-ones norms would hide swapped norms)."""
    cfg = tiny_config(*MLA, *overrides)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model, cfg


def exported(tmp_path, name, *overrides):
    model, cfg = mla_model(*overrides)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()  # as the trainer exports: named once
    export_model({k: v for k, v in model.state_dict().items() if k not in tied}, cfg, None, str(tmp_path / name), 1)
    return model, str(tmp_path / name)


def model_type(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["model_type"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vanilla_mla_converts_to_native_deepseek_v3(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    from megamem.eval import load_any

    ours, source = exported(tmp_path, "run", "memory.vanilla_mode=true", *VARIANTS[variant])
    folder = str(tmp_path / "hf")
    assert run_cli(lambda: convert_cli()(["--checkpoint", source, "--output", folder])) == 0  # --format auto
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert config["first_k_dense_replace"] == 4 and config["num_nextn_predict_layers"] == 0
    assert config["n_routed_experts"] == config["n_shared_experts"] == 0 and config["rope_interleave"] is False
    assert not [f for f in os.listdir(folder) if f.endswith(".py")]  # nothing to trust: no remote code
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__module__ == "transformers.models.deepseek_v3.modeling_deepseek_v3"
    assert not any("mlp.experts" in n or "mlp.gate." in n for n, _ in hf.named_parameters())  # no MoE layer
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(ids).logits
        assert (hf(ids).logits - ref).abs().max() <= 1e-5
        assert (load_any(folder).hf(ids).logits - ref).abs().max() <= 1e-5  # scripts/eval.py's, inference.py's loader
    theirs = hf.generate(ids[:, :4], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, ours.generate(ids[:, :4], 8))


def test_the_rope_layout_is_what_the_parity_rests_on():
    """megamem rotates pairs (i, i + d/2): DeepSeek-V3 with rope_interleave true differs with the same weights."""
    from transformers import DeepseekV3ForCausalLM

    ours, cfg = mla_model("memory.vanilla_mode=true", "model.mla_config.rope_theta=50")
    ids = torch.randint(0, 61, (2, 17))
    gaps = []
    for interleave in (False, True):
        config = deepseek_v3_config(cfg)
        config.rope_interleave = interleave
        hf = DeepseekV3ForCausalLM(config).eval()
        hf.load_state_dict(to_deepseek_v3_state_dict(ours.state_dict(), cfg))
        with torch.no_grad():
            gaps.append((hf(ids).logits - ours(ids).logits).abs().max().item())
    assert gaps[0] <= 1e-5 and gaps[1] > 1e-3, gaps  # 100x the parity tolerance


def test_bf16_export_and_the_other_formats(tmp_path):
    from transformers import AutoModelForCausalLM

    _, source = exported(tmp_path, "run", "memory.vanilla_mode=true")
    folder = convert_to_hf(source, str(tmp_path / "bf16"), dtype="bf16", hf_format="deepseek_v3")
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16
    assert model_type(convert_to_hf(source, str(tmp_path / "mm"), hf_format="megamem")) == "megamem"
    with pytest.raises(ConfigError, match=r"^--format llama: .* is not exactly a Llama model: model.attention_type is "
                                          r"'mla' \(Llama expresses only 'mha' or 'standard' or 'gqa'\)"):
        convert_to_hf(source, str(tmp_path / "llama"), hf_format="llama")
    with pytest.raises(ConfigError, match=r"^--format gguf; valid: auto, llama, deepseek_v3, megamem$"):
        convert_to_hf(source, str(tmp_path / "gguf"), hf_format="gguf")
    assert not (tmp_path / "llama").exists() and not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("kind,overrides,reason", [
    ("memory", MEMORY, r"the model has memory layers \(DeepSeek-V3 has no memory cross-attention\)"),
    ("peer", ("memory.vanilla_mode=true", *PEER),
     r"model.use_peer is True \(DeepSeek-V3 expresses only no value but its default\) \(and 1 more\)"),
])
def test_memory_and_peer_models_are_refused_and_auto_keeps_the_megamem_format(tmp_path, capsys, kind, overrides,
                                                                             reason):
    from transformers import AutoModelForCausalLM

    ours, source = exported(tmp_path, "run", *overrides)
    capsys.readouterr()
    refused = str(tmp_path / "refused")
    assert run_cli(lambda: convert_cli()(["--checkpoint", source, "--output", refused, "--format", "deepseek_v3"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not os.path.exists(refused), err
    assert err[0].startswith(f"error: --format deepseek_v3: {source} is not exactly a DeepSeek-V3 model: ")
    assert err[0].endswith("; convert with --format auto (megamem's format)")
    assert re.search(reason, err[0]), err[0]
    folder = convert_to_hf(source, str(tmp_path / "auto"))
    assert model_type(folder) == "megamem"
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(3, 61, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-5


def test_weights_without_a_deepseek_v3_place_are_refused():
    _, cfg = mla_model("memory.vanilla_mode=true")
    state = {**build_model(cfg).state_dict(), "banks.0.memory": torch.zeros(4, 32)}
    with pytest.raises(ConfigError, match=r"^this model cannot be exported as native DeepSeek-V3: its weights "
                                          r"\['banks.0.memory'\] have no DeepSeek-V3 counterpart; export it in the "
                                          r"megamem format$"):
        to_deepseek_v3_state_dict(state, cfg)


def test_inference_and_eval_scripts_read_the_folder_as_they_read_megamem(tmp_path, capsys):
    """scripts/inference.py and scripts/eval.py on the native folder: megamem's greedy text and perplexity."""
    from test_eval_inference import exported as exported_with_data
    from test_eval_inference import script

    final, hf, _, _, _ = exported_with_data(tmp_path, *MLA, "memory.vanilla_mode=true", "data.document_masking=false")
    assert model_type(hf) == "deepseek_v3"
    inference, eval_, texts, ppl = script("inference"), script("eval"), [], []
    for source in (final, hf):
        assert inference.main(["--model", source, "--prompt", "the light of", "--temperature", "0",
                               "--max-new-tokens", "7"]) == 0
        texts.append(capsys.readouterr().out.splitlines()[-1])  # the generated text (after any import warning)
        extra = [] if source == final else ["--config", os.path.join(final, "config.yaml")]
        assert eval_.main(["--model", source, "--output", str(tmp_path / "r.json"), *extra]) == 0
        capsys.readouterr()
        with open(tmp_path / "r.json") as f:
            ppl.append(json.load(f)["perplexity"])
    assert texts[0].strip() and texts[1] == texts[0]
    assert ppl[1]["tokens"] == ppl[0]["tokens"] > 0 and abs(ppl[1]["loss"] - ppl[0]["loss"]) < 1e-5
