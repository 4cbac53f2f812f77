"""pos_encoding.type pi_spiral on adapter models: g·e_n added to the base's embeddings, g a gate at 0.
References: the unmodified HF model (fresh gate), the HF model with a hand-written embedding hook adding a float64
spiral, a full forward without cache (decoding)."""
import math

import pytest
import torch

from adapter_utils import VOCAB, adapter_config, saved_base

from megamem.adapter import build_adapter_model, load_adapter, save_adapter
from megamem.config import ConfigError

IDS = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
ALPHA = {"pi": math.pi, "e": math.e}


def _spiral64(n, dim, alpha):
    phase = 2 * math.pi * ((n * alpha) % 1.0)  # float64 holds n·α to ~1e-14 turns below 100 positions
    k = torch.arange(1, dim // 2 + 1, dtype=torch.float64)
    return math.sqrt(2.0 / dim) * torch.cat(((k * phase).cos(), (k * phase).sin()))


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("irrational", ["pi", "e"])
def test_gated_spiral_equals_base_at_zero_and_a_float64_reference_when_open(tmp_path, family, irrational):
    path, base = saved_base(tmp_path, family)
    model = build_adapter_model(adapter_config(path, "model.pos_encoding.type=pi_spiral",
                                               f"model.pos_encoding.irrational={irrational}"), seed=0).eval()
    with torch.no_grad():
        plain = base(IDS).logits
        assert torch.equal(model(IDS).logits, plain)  # gate 0: the base exactly
        model.spiral.gate.fill_(0.7)
        got = model(IDS).logits
    spiral = torch.stack([_spiral64(n, 32, ALPHA[irrational]) for n in range(IDS.shape[1])]).float()
    base.get_input_embeddings().register_forward_hook(lambda m, a, out: out + 0.7 * spiral)
    with torch.no_grad():
        want = base(IDS).logits
    assert (got - want).abs().max() <= 1e-5 and (got - plain).abs().max() > 1e-3


def test_cached_decoding_continues_the_positions(tmp_path):
    path, _ = saved_base(tmp_path, "llama")
    model = build_adapter_model(adapter_config(path, "model.pos_encoding.type=pi_spiral"), seed=0).eval()
    with torch.no_grad():
        model.spiral.gate.fill_(0.7)
    prompt = IDS[:, :20]
    out = model.generate(prompt, 10, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        reference = model(out.sequences[:, :-1]).logits  # one full forward without cache
    assert (torch.stack(out.logits, dim=1) - reference[:, 19:]).abs().max() <= 1e-5


def test_gate_trains_in_the_memory_group_and_reloads(tmp_path):
    path, _ = saved_base(tmp_path, "llama")
    cfg = adapter_config(path, "model.pos_encoding.type=pi_spiral")
    model = build_adapter_model(cfg, seed=0)
    gate = model.spiral.gate
    assert gate.requires_grad and any(p is gate for p in model.memory_parameters())
    model(IDS, labels=IDS).loss.backward()
    assert gate.grad.abs().item() > 0  # the closed gate still gets a gradient (Σ ∂L/∂x_n · e_n)
    with torch.no_grad():
        gate.fill_(0.3)
    save_adapter(model, cfg, str(tmp_path / "ad"))
    loaded, _, _ = load_adapter(str(tmp_path / "ad"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(IDS).logits, model.eval()(IDS).logits)


def test_refusals():
    with pytest.raises(ConfigError, match="pi_spiral on an adapter run .* trains with the memory adapter"):
        adapter_config("some/base", "model.pos_encoding.type=pi_spiral", "memory.use_memory_adapter=false",
                       "memory.use_lora=true")
    with pytest.raises(ConfigError, match="model.pos_encoding.type alibi applies to from-scratch models"):
        adapter_config("some/base", "model.pos_encoding.type=alibi")
