"""pos_encoding.type hybrid on adapter models: angle (1 − g·w(n))·n·θ_i in the base's rotary module and g·w(n)·e_n
added to its embeddings, g a gate at 0. References: the unmodified HF model (fresh gate), a float64 formula of the
angles, megamem's from-scratch HybridPositions (g = 1), the HF model with hand-written float64 hooks, a finite
difference of the loss (the gate's gradient), a full forward without cache (decoding)."""
import math

import pytest
import torch

from adapter_utils import VOCAB, adapter_config, saved_base, tiny_hf
from conftest import assert_future_never_changes_the_past, tiny_config

from megamem.adapter import build_adapter_model, load_adapter, save_adapter
from megamem.config import ConfigError
from megamem.model.positions.hybrid import HybridPositions

IDS = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
K = 16  # positions 0 … 39 cross K


def _hybrid(path, W=4, *keys):
    cfg = adapter_config(path, "model.pos_encoding.type=hybrid", f"model.pos_encoding.hybrid_K={K}",
                         f"model.pos_encoding.transition_width={W}", *keys)
    return build_adapter_model(cfg, seed=0).eval()


def _w64(n, W):
    """w(n) = σ((n − K)/W) in float64 (W = 0: the step at K)."""
    return (1.0 if n >= K else 0.0) if W == 0 else 1.0 / (1.0 + math.exp(-(n - K) / W))


def _angles64(config, positions, g, W):
    """[S, d/2] float64: (1 − g·w(n))·n·θ_i, θ_i = rope_theta^(−2i/d), d the base's head dim."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    scale = torch.tensor([(1.0 - g * _w64(int(n), W)) * int(n) for n in positions], dtype=torch.float64)
    return scale[:, None] * theta[None, :]


def _spiral64(n, dim):
    phase = 2 * math.pi * ((n * math.pi) % 1.0)  # float64 holds n·π to ~1e-14 turns below 100 positions
    k = torch.arange(1, dim // 2 + 1, dtype=torch.float64)
    return math.sqrt(2.0 / dim) * torch.cat(((k * phase).cos(), (k * phase).sin()))


def _hooked_reference(base, g, W):
    """The unmodified HF model with two hand-written float64 hooks: its rotary module's (cos, sin) at the hybrid
    angles, and g·w(n)·e_n added to its embeddings (full forwards without cache: n = 0 … S − 1)."""
    def rotary(module, args, kwargs, output):
        position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        emb = torch.cat([_angles64(base.config, position_ids[0], g, W)] * 2, dim=-1)[None]
        return emb.cos().to(output[0].dtype), emb.sin().to(output[1].dtype)

    def embed(module, args, out):
        dim = out.shape[-1]
        added = torch.stack([g * _w64(n, W) * _spiral64(n, dim) for n in range(out.shape[1])])
        return out + added.to(out.dtype)

    base.model.rotary_emb.register_forward_hook(rotary, with_kwargs=True)
    base.get_input_embeddings().register_forward_hook(embed)
    return base


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("W", [0, 4])
def test_fresh_hybrid_equals_the_base(tmp_path, family, W):
    path, base = saved_base(tmp_path, family)
    model = _hybrid(path, W)
    assert model.hybrid.gate.item() == 0.0
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)  # gate 0: the base bit for bit, across K
    prompt = IDS[:, :10]
    got = model.generate(prompt, 14)  # greedy, with HF's KV cache, crossing K
    want = base.generate(prompt, max_new_tokens=14, do_sample=False, attention_mask=torch.ones_like(prompt),
                         pad_token_id=0, temperature=None, top_k=None, top_p=None)
    assert torch.equal(got, want)


def test_fresh_hybrid_with_lora_equals_the_base(tmp_path):
    path, base = saved_base(tmp_path, "qwen2")
    model = _hybrid(path, 4, "memory.use_both_memory_and_lora=true", "memory.lora_rank=4")
    assert model.lora_parameters()  # peft injected in place: the rotary module is still the family's
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)  # LoRA B = 0, zero-init memory, gate 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("W", [0, 4])
def test_open_gate_angles_and_logits_equal_float64_references(tmp_path, family, W):
    path, base = saved_base(tmp_path, family)
    model = _hybrid(path, W)
    tables = []
    model.base.model.rotary_emb.register_forward_hook(lambda m, a, out: tables.append(out))  # after the hybrid's
    with torch.no_grad():
        plain = model(IDS).logits
        model.hybrid.gate.fill_(1.0)
        model(IDS)
    cos, sin = tables[-1]
    angles = torch.atan2(sin[0].double(), cos[0].double())[:, :cos.shape[-1] // 2]
    want = _angles64(base.config, range(IDS.shape[1]), 1.0, W)
    wrapped = torch.remainder(angles - want + math.pi, 2 * math.pi) - math.pi
    assert wrapped.abs().max() <= 2e-6, wrapped.abs().max()  # float32 tables: measured ≤ 2.6e-7
    for g in (1.0, 0.5):
        with torch.no_grad():
            model.hybrid.gate.fill_(g)
            got = model(IDS).logits
        with torch.no_grad():
            reference = _hooked_reference(tiny_hf(family), g, W)(IDS).logits  # the saved base's weights (seed 0)
        assert (got - reference).abs().max() <= 1e-5, (got - reference).abs().max()
        assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("W", [0, 4])
def test_open_gate_is_megamems_from_scratch_hybrid_bit_for_bit(tmp_path, W):
    """g = 1: the rotary tables and the embedded input equal megamem's from-scratch HybridPositions exactly."""
    path, base = saved_base(tmp_path, "llama")
    model = _hybrid(path, W)
    scratch = HybridPositions(tiny_config("model.pos_encoding.type=hybrid", f"model.pos_encoding.hybrid_K={K}",
                                          f"model.pos_encoding.transition_width={W}",
                                          f"model.rope_theta={base.config.rope_parameters['rope_theta']}").model)
    tables, inputs = [], []
    model.base.model.rotary_emb.register_forward_hook(lambda m, a, out: tables.append(out))
    model.base.model.layers[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        model.hybrid.gate.fill_(1.0)
        model(IDS)
        positions = torch.arange(IDS.shape[1])
        cos, sin = scratch.prepare(positions, torch.float32)
        embedded = scratch.embed(base.get_input_embeddings()(IDS), positions)
    assert torch.equal(tables[-1][0][0], cos) and torch.equal(tables[-1][1][0], sin)
    assert torch.equal(inputs[-1], embedded)


def test_gate_gradient_equals_a_finite_difference_and_a_step_leaves_the_base(tmp_path):
    path, base = saved_base(tmp_path, "llama")
    model = _hybrid(path, 4)
    gate = model.hybrid.gate
    assert gate.requires_grad and any(p is gate for p in model.memory_parameters())
    model(IDS, labels=IDS).loss.backward()
    grad = gate.grad.item()

    def loss_at(g):
        with torch.no_grad():
            gate.fill_(g)
            return model(IDS, labels=IDS).loss.double().item()
    eps = 1e-2
    finite = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert grad != 0.0 and abs(grad - finite) <= 0.02 * abs(finite) + 1e-5, (grad, finite)
    with torch.no_grad():
        gate.zero_()
    torch.optim.SGD([gate], lr=1.0).step()  # one step with the gradient at the base
    assert gate.item() == pytest.approx(-grad)
    with torch.no_grad():
        assert (model(IDS).logits - base(IDS).logits).abs().max() > 1e-4


@pytest.mark.parametrize("W", [0, 4])
def test_causal_and_kv_cache_decode_equals_full_forward_across_K(tmp_path, W):
    path, _ = saved_base(tmp_path, "llama")
    model = _hybrid(path, W)
    with torch.no_grad():
        model.hybrid.gate.fill_(0.8)
        for t in (5, K, 30):
            assert_future_never_changes_the_past(model, IDS, t, VOCAB)
    prompt = IDS[:, :10]
    out = model.generate(prompt, 14, output_logits=True, return_dict_in_generate=True)  # positions 10 … 23
    with torch.no_grad():
        reference = model(out.sequences[:, :-1]).logits  # one full forward, no cache
    steps = torch.stack(out.logits, dim=1)
    assert (steps - reference[:, 9:]).abs().max() <= 1e-5
    assert torch.equal(out.sequences[:, 10:], reference[:, 9:].argmax(-1))


def test_export_reloads_to_the_same_logits(tmp_path):
    path, _ = saved_base(tmp_path, "qwen2")
    cfg = adapter_config(path, "model.pos_encoding.type=hybrid", f"model.pos_encoding.hybrid_K={K}",
                         "model.pos_encoding.transition_width=4")
    model = build_adapter_model(cfg, seed=0).eval()
    with torch.no_grad():
        model.hybrid.gate.fill_(0.3)
    assert "hybrid.gate" in model.export_names()
    save_adapter(model, cfg, str(tmp_path / "ad"))
    loaded, _, _ = load_adapter(str(tmp_path / "ad"))
    assert loaded.hybrid.gate.item() == pytest.approx(0.3)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_refusals(tmp_path, monkeypatch):
    from megamem.adapter import families

    with pytest.raises(ConfigError, match="hybrid on an adapter run .* trains with the memory adapter"):
        adapter_config("some/base", "model.pos_encoding.type=hybrid", "memory.use_memory_adapter=false",
                       "memory.use_lora=true")
    path, _ = saved_base(tmp_path, "llama")
    monkeypatch.setitem(families.FAMILIES, "llama", families.Family(layers=lambda m: m.model.layers, rotary=None))
    with pytest.raises(ConfigError, match="model.pos_encoding.type hybrid: model type 'llama' has no rotary hook"):
        _hybrid(path)
