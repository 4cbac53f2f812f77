"""Memory models exported as Hugging Face folders (remote code): same logits, same greedy tokens."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megamem.config import ConfigError
from megamem.folders import export_model
from megamem.hf.convert import convert_to_hf
from megamem.hf.folder import write_megamem_folder
from megamem.hf.load import load_exported
from megamem.model import build_model

from conftest import ROOT, tiny_config
from test_model import BANKS

CHAPTERS = ("memory.use_chapters=true", "memory.num_chapters=6", "memory.num_memory_tokens=24",
            "memory.top_k_chapters=2", "memory.num_shared_chapters=1", "memory.rolling_interval=2",
            "memory.rolling_window=3")
VARIANTS = {
    **{f"bank-{k}": v for k, v in BANKS.items()},
    "layout-B-per-layer": ["memory.memory_block_variant=B", "memory.memory_sharing=per_layer"],
    "every-k-custom": ["memory.memory_sharing=every_k_layers", "memory.memory_sharing_k=2",
                       "memory.memory_layer_placement=custom", "memory.memory_layer_indices=[3, 0, 2]"],
    "tied-learned-pos-layernorm-gelu": ["model.tie_embeddings=true", "model.use_rope=false",
                                        "model.use_rms_norm=false", "model.hidden_activation=gelu"],
    "vanilla-not-llama": ["memory.vanilla_mode=true", "model.use_rms_norm=false"],
    **{f"chapters-seq-{s}": [*CHAPTERS, f"memory.routing_strategy_inference={s}"]
       for s in ("sequence", "rolling", "token")},
    "chapters-token-shared-router": [*CHAPTERS, "memory.routing_strategy_train=token",
                                     "memory.routing_strategy_inference=token", "memory.shared_router=true"],
}


def variant_model(overrides):
    torch.manual_seed(0)
    cfg = tiny_config("memory.wo_init_zero=false", *overrides)
    model = build_model(cfg).eval()
    for i in model.memory_layers:  # routers that actually discriminate between chapters
        router = getattr(model.blocks[i].memory.attn, "router", None)
        if router is not None:
            torch.nn.init.normal_(router.weight, std=1.0)
    return model, cfg


def hf_folder(model, cfg, path, dtype="fp32", **kwargs):
    os.makedirs(path)
    write_megamem_folder(str(path), model.state_dict(), cfg, dtype, **kwargs)
    return str(path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_model_equals_megamem(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    model, cfg = variant_model(VARIANTS[variant])
    folder = hf_folder(model, cfg, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(3, 61, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        assert (hf(ids).logits - ref).abs().max() <= 1e-5
        back, _, _ = load_exported(folder)  # HF folder → megamem model
        assert (back(ids).logits - ref).abs().max() <= 1e-5
    ours = model.generate(ids[:, :4], 8)
    theirs = hf.generate(ids[:, :4], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, ours)


def test_routing_strategy_chosen_at_load_and_refused_when_unknown(tmp_path):
    from transformers import AutoModelForCausalLM

    model, cfg = variant_model([*CHAPTERS, "memory.routing_strategy_inference=sequence"])
    folder = hf_folder(model, cfg, tmp_path / "hf")
    ids = torch.randint(3, 61, (2, 5))
    for strategy in ("rolling", "token"):
        hf = AutoModelForCausalLM.from_pretrained(folder, routing_strategy_inference=strategy).eval()
        model.memory_config.routing_strategy_inference = strategy
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out, model.generate(ids, 8))
    hf.set_routing_strategy("sequence")
    model.memory_config.routing_strategy_inference = "sequence"
    assert torch.equal(hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0),
                       model.generate(ids, 8))
    with pytest.raises(ConfigError, match="routing_strategy_inference = 'chapter'; valid: sequence, rolling, token"):
        AutoModelForCausalLM.from_pretrained(folder, routing_strategy_inference="chapter")


def test_padding_beams_and_labels(tmp_path):
    from transformers import AutoModelForCausalLM

    model, cfg = variant_model([])
    hf = AutoModelForCausalLM.from_pretrained(hf_folder(model, cfg, tmp_path / "hf")).eval()
    ids = torch.randint(3, 61, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = hf(ids, labels=labels)
        logp = model(ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = labels[:, 1:] != -100
        assert torch.allclose(out.loss, -logp[keep].mean(), atol=1e-6)
        right = torch.ones_like(ids)
        right[0, 5:] = 0  # right padding leaves the real tokens' logits unchanged
        assert torch.allclose(hf(ids, attention_mask=right).logits, out.logits)
        with pytest.raises(ValueError, match="right padding only"):
            hf(ids, attention_mask=right.flip(1))
    with pytest.raises(ValueError, match="num_beams=1"):
        hf.generate(ids, max_new_tokens=2, num_beams=2)


def test_bf16_sharded_export_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model, cfg = variant_model(BANKS["int8"])
    folder = hf_folder(model, cfg, tmp_path / "hf", dtype="bf16", max_shard_size="20KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(3, 61, (2, 9))
    inv_freq = model.pos_embeddings.inv_freq.clone()
    ref = model.to(torch.bfloat16)
    ref.pos_embeddings.inv_freq = inv_freq  # transformers keeps RoPE frequencies in fp32, as for Llama
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref(ids).logits)


REMOTE = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    save_file({"logits": m(ids).logits}, sys.argv[3])
print(type(m).__module__)
"""


def test_remote_code_in_a_fresh_process(tmp_path):
    """A user's process: transformers alone, trust_remote_code (megamem installed). In-process
    registration (no remote code) is what the other tests here use: this process imported megamem."""
    from safetensors.torch import load_file

    model, cfg = variant_model(["model.tie_embeddings=true", *CHAPTERS])
    folder = hf_folder(model, cfg, tmp_path / "hf")
    ids = torch.randint(3, 61, (1, 6))
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", REMOTE, folder, json.dumps(ids.tolist()),
                          str(tmp_path / "logits.safetensors")], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("transformers_modules.")
    with torch.no_grad():
        assert (load_file(str(tmp_path / "logits.safetensors"))["logits"] - model(ids).logits).abs().max() <= 1e-5


def test_convert_refuses_bad_inputs(tmp_path):
    model, cfg = variant_model([])
    export_model(model.state_dict(), cfg, None, str(tmp_path / "final"), 1)
    with pytest.raises(ConfigError, match="--dtype fp8; valid: fp32, bf16, fp16"):
        convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf"), dtype="fp8")
    with pytest.raises(ConfigError, match="not an adapter run"):
        convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf"), merge_lora=True)
    other = tiny_config("memory.memory_sharing=per_layer")
    export_model(model.state_dict(), other, None, str(tmp_path / "mismatch"), 1)
    with pytest.raises(ConfigError, match=r"do not match their config.yaml: missing \['banks.1.memory'"):
        convert_to_hf(str(tmp_path / "mismatch"), str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")
    step = tmp_path / "ckpt" / "step2"  # a pipeline checkpoint with a truncated layer file
    step.mkdir(parents=True)
    for name in ("COMPLETE", "layer_00-model_states.pt"):
        (step / name).write_text("")
    (step / "config.yaml").write_text(open(tmp_path / "final" / "config.yaml").read())
    with pytest.raises(ConfigError, match="layer_00-model_states.pt: not a readable weights file .*truncated or corrupt"):
        convert_to_hf(str(step), str(tmp_path / "hf"))


@pytest.mark.parametrize("stage,ranks", [(3, 2), (0, 1)])
def test_checkpoint_of_a_memory_model_converts(tmp_path, stage, ranks):
    """ZeRO-3 partitions of 2 ranks are merged; a ZeRO-0 checkpoint holds whole weights."""
    from transformers import AutoModelForCausalLM

    from dist_utils import run_ranks
    from test_train import ZERO, _fit

    out = tmp_path / "run"
    run_ranks(_fit, str(out), ZERO[stage], 2, ("training.max_steps=2", "model.tie_embeddings=true", *CHAPTERS),
              world_size=ranks, tmp_path=tmp_path / "r")
    ours, _, _ = load_exported(str(out / "final"))
    ids = torch.randint(3, 61, (2, 9))
    folder = convert_to_hf(str(out / "checkpoints"), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-5
    assert torch.equal(hf.generate(ids[:, :3], max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0),
                       ours.generate(ids[:, :3], 5))


def test_a_fresh_hf_model_keeps_megamem_initialisation():
    from megamem.hf.configuration import MegamemHFConfig
    from megamem.hf.modeling import MegamemForCausalLM

    cfg = tiny_config()  # wo_init_zero: the memory path starts as the identity
    hf = MegamemForCausalLM(MegamemHFConfig.from_megamem(cfg))
    outputs = [m.weight for b in hf.model.blocks if b.memory is not None for m in b.memory.output_layers()]
    assert outputs and all(not w.any() for w in outputs)
    assert hf.model.tok_embeddings.weight.std().item() == pytest.approx(cfg.model.initializer_range, rel=0.2)


def test_convert_cli_reports_bad_paths(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_to_hf", os.path.join(ROOT, "tools", "convert_to_hf.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    from megamem.cli import run_cli

    assert run_cli(lambda: cli.main(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])) == 2
    assert "does not exist (expected an export folder (output_dir/final)" in capsys.readouterr().err
    assert run_cli(lambda: cli.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o")])) == 2
    assert "nor a checkpoint (no COMPLETE marker), nor a checkpoints folder (no 'latest' file)" in capsys.readouterr().err


def test_import_megamem_registers_with_transformers_lazily():
    """`import megamem` alone imports no transformers; its auto classes know megamem once they load."""
    code = ("import sys, megamem; assert 'transformers' not in sys.modules, 'eager'; "
            "from transformers import AutoTokenizer, AutoConfig, AutoModelForCausalLM; "
            "assert 'transformers.modeling_utils' not in sys.modules, 'model machinery imported'; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "print(CONFIG_MAPPING['megamem'].__module__, AutoModelForCausalLM._model_mapping[CONFIG_MAPPING['megamem']].__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["megamem.hf.configuration", "megamem.hf.modeling"]
