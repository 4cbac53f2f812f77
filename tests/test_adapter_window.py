"""model.window_size on adapter models: every layer of the base becomes a transformers sliding-window layer.
References: transformers' model built with that sliding window in its own config, the unmodified base (positions
the window does not cut), a full forward without cache (decoding), the size of HF's cache."""
import pytest
import torch

from adapter_utils import VOCAB, adapter_config, saved_base

from megamem.adapter import build_adapter_model
from megamem.config import ConfigError

IDS = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
W = 8
# each family's own config keys for "every layer slides over W tokens"
# (a saved Qwen config lists its layer_types, so they are given too; the tiny bases have 3 layers)
QWEN = {"use_sliding_window": True, "sliding_window": W, "max_window_layers": 0,
        "layer_types": ["sliding_attention"] * 3}
NATIVE = {"mistral": {"sliding_window": W}, "qwen2": QWEN, "qwen3": QWEN}


@pytest.mark.parametrize("family", sorted(NATIVE))
def test_window_equals_transformers_sliding_window(tmp_path, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    path, base = saved_base(tmp_path, family)
    model = build_adapter_model(adapter_config(path, f"model.window_size={W}"), seed=0).eval()
    config = AutoConfig.from_pretrained(path, **NATIVE[family])
    reference = AutoModelForCausalLM.from_pretrained(path, config=config).eval()
    with torch.no_grad():
        got = model(IDS).logits
        assert torch.equal(got, reference(IDS).logits)
        plain = base(IDS).logits
    assert torch.equal(got[:, :W], plain[:, :W])  # the first W positions see everything anyway
    assert (got[:, W:] - plain[:, W:]).abs().max() > 1e-4  # later ones do not
    out = model.generate(IDS[:, :20], 12, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits  # one forward without cache, window mask
    assert (torch.stack(out.logits, dim=1) - full[:, 19:]).abs().max() <= 1e-5
    cache = out.past_key_values
    assert all(layer.keys.shape[2] <= W for layer in cache.layers)  # decoding memory stays at the window


def test_window_refused_for_llama(tmp_path):
    path, _ = saved_base(tmp_path, "llama")
    with pytest.raises(ConfigError, match="model.window_size: model type 'llama' has no sliding-window attention "
                                          r"in transformers \(supported: mistral, qwen2, qwen3\)"):
        build_adapter_model(adapter_config(path, f"model.window_size={W}"), seed=0)
