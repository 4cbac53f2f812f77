"""model.attractor on adapter models: the branch injected into a pretrained HF base by the layer hook.
References: the unmodified HF model (fresh adapter), a float64 loop over the recurrence hooked into the HF
model by hand, a full forward without cache (decoding), the same prefix with other later tokens (causality)."""
import math

import pytest
import torch

from adapter_utils import VOCAB, adapter_config, saved_base

from megamem.adapter import build_adapter_model, load_adapter, save_adapter
from megamem.config import ConfigError

IDS = torch.randint(3, VOCAB, (2, 100), generator=torch.Generator().manual_seed(0))  # > one 64-token chunk


def _cfg(path, *keys):
    return adapter_config(path, "model.attractor.use_attractor=true", *keys)


def _randomise(model, std=0.3):
    """Non-zero attractor outputs, so the branch really changes the logits."""
    torch.manual_seed(5)
    for branch in model.attractors.values():
        for layer in branch.output_layers():
            torch.nn.init.normal_(layer.weight, std=std)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("inject, policy", [("cross_attn", "exp_c_over_N"), ("residual", "learned")])
def test_fresh_attractor_equals_the_base(tmp_path, family, inject, policy):
    path, base = saved_base(tmp_path, family)
    model = build_adapter_model(_cfg(path, f"model.attractor.attractor_inject={inject}",
                                     f"model.attractor.alpha_policy={policy}"), seed=0).eval()
    assert sorted(model.attractors) == ["0", "1", "2"]  # inject_layers: all, the base's 3 layers
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)
    prompt = IDS[:, :9]
    expected = base.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=2)
    assert torch.equal(model.generate(prompt, 6, eos_token_id=2), expected)
    _randomise(model)
    with torch.no_grad():
        assert (model(IDS).logits - base(IDS).logits).abs().max() > 1e-3  # the hooks really are in the path


def _spiral64(n, dim):
    phase = 2 * math.pi * ((n * math.pi) % 1.0)  # float64 is exact enough below 100 positions
    k = torch.arange(1, dim // 2 + 1, dtype=torch.float64)
    return math.sqrt(2.0 / dim) * torch.cat(((k * phase).cos(), (k * phase).sin()))


def _reference_hook(branch, alpha, eps):
    """y + W_o·(C_{t−1}·W_q·norm(y_t)), C_t = α·C_{t−1} + (W_u·norm(y_t)) ⊗ e_t, a float64 loop."""
    wn, wu, wq, wo = (p.detach().double() for p in (branch.norm.weight, branch.u_proj.weight,
                                                    branch.q_proj.weight, branch.o_proj.weight))

    def hook(module, args, output):
        y = (output[0] if isinstance(output, tuple) else output).double()
        h = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * wn
        out = y.clone()
        for b in range(y.shape[0]):
            C = torch.zeros(wu.shape[0], y.shape[-1], dtype=torch.float64)
            for t in range(y.shape[1]):
                out[b, t] += wo @ (C @ (wq @ h[b, t]))
                C = alpha * C + torch.outer(wu @ h[b, t], _spiral64(t, y.shape[-1]))
        out = out.float()
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
    return hook


def test_injected_residual_attractor_equals_a_float64_recurrence(tmp_path):
    path, base = saved_base(tmp_path, "llama")
    model = build_adapter_model(_cfg(path, "model.attractor.attractor_inject=residual",
                                     "model.attractor.alpha_policy=fixed",
                                     "model.attractor.alpha_value=0.9", "model.attractor.inject_layers=[1]"),
                                seed=0).eval()
    _randomise(model)
    branch = model.attractors["1"]
    base.model.layers[1].register_forward_hook(_reference_hook(branch, 0.9, base.config.rms_norm_eps))
    with torch.no_grad():
        got, want = model(IDS).logits, base(IDS).logits
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()


@pytest.mark.parametrize("inject", ["cross_attn", "residual"])
def test_causal_and_kv_cache_decode_equals_full_forward(tmp_path, inject):
    path, _ = saved_base(tmp_path, "llama")
    model = build_adapter_model(_cfg(path, f"model.attractor.attractor_inject={inject}"), seed=0).eval()
    _randomise(model)
    changed = IDS.clone()
    changed[:, 41:] = torch.randint(3, VOCAB, changed[:, 41:].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(IDS).logits
        assert (model(changed).logits[:, :41] - full[:, :41]).abs().max() <= 1e-6  # tokens after t never count
    prompt = IDS[:, :60]
    out = model.generate(prompt, 12, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        reference = model(out.sequences[:, :-1]).logits  # one full forward, no cache, over prompt + generated
    steps = torch.stack(out.logits, dim=1)  # [B, 12, V]: the cached decoding steps (crossing the 64-token chunk)
    assert (steps - reference[:, 59:]).abs().max() <= 1e-5
    assert torch.equal(out.sequences[:, 60:], reference[:, 59:].argmax(-1))


def test_attractor_trains_in_the_memory_group_and_reloads(tmp_path):
    path, base = saved_base(tmp_path, "llama")
    cfg = _cfg(path, "model.attractor.attractor_inject=cross_attn", "model.attractor.alpha_policy=learned")
    model = build_adapter_model(cfg, seed=0)
    memory = {id(p) for p in model.memory_parameters()}
    attractor = list(model.attractors.parameters())
    assert attractor and all(p.requires_grad and id(p) in memory for p in attractor)
    out = model(IDS[:, :70], labels=IDS[:, :70])
    out.loss.backward()
    for branch in model.attractors.values():
        assert branch.attn.o_proj.weight.grad.abs().max() > 0  # the zero output projection gets a gradient
    with torch.no_grad():
        for p in attractor:
            if p.grad is not None:
                p -= 0.5 * p.grad
        moved = model(IDS).logits
    assert (moved - base(IDS).logits).abs().max() > 1e-4  # one step off zero changes the model
    save_adapter(model, cfg, str(tmp_path / "ad"))
    loaded, _, _ = load_adapter(str(tmp_path / "ad"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(IDS).logits, model.eval()(IDS).logits)


@pytest.mark.parametrize("keys, message", [
    (["model.attractor.inject_layers=last_N", "model.attractor.N_inject=5"],
     "model.attractor.N_inject must be in [1, 3] (model.num_layers)"),
    (["model.attractor.inject_layers=[0,3]"], "model.attractor.inject_layers must list distinct layers in [0, 3)"),
])
def test_layers_checked_against_the_base(tmp_path, keys, message):
    path, _ = saved_base(tmp_path, "llama")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_adapter_model(_cfg(path, *keys), seed=0)


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="trains with the memory adapter"):
        _cfg("some/base", "memory.use_memory_adapter=false", "memory.use_lora=true")
    path, _ = saved_base(tmp_path, "llama")
    model = build_adapter_model(_cfg(path), seed=0)
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    with pytest.raises(ConfigError, match="padded positions would put the padding into the attractor state"):
        model(IDS, attention_mask=mask)
