"""The model's extension seams: registries (attention, MLP, positions, block branches), the config
keys that pick them and their aliases, the forward context's hooks, the per-layer decoding cache, and
activation checkpointing applied from outside.

New parts are registered here the way a new file would register them, and checked against
independent references (hand-written attention with the bias, the model without the part).
"""
import math

import pytest
import torch
import torch.nn as nn

from megamem.config import ConfigError, config_from_dict, dump_config, load_config
from megamem.model import build_model
from megamem.model.attention import ATTENTION
from megamem.model.branches import BRANCHES, ResidualBranch
from megamem.model.positions import POSITIONS, PositionEncoding
from megamem.parallel.checkpointing import activation_checkpointing, set_activation_checkpointing

from conftest import ROOT, tiny_config

IDS = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))


def make(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_config("memory.wo_init_zero=false", *overrides))


@pytest.fixture
def registered(monkeypatch):
    """Register a part for one test only: registered(REGISTRY, name, ctor)."""
    def add(registry, name, ctor):
        monkeypatch.setitem(registry.entries, name, ctor)
        return ctor
    return add


# ------------------------------------------------------------------ config keys and aliases
@pytest.mark.parametrize("alias,canonical", [
    (["model.use_rope=false"], ["model.pos_encoding.type=learned"]),
    (["model.use_rope=true"], ["model.pos_encoding.type=rope"]),
    (["model.hidden_activation=gelu"], ["model.mlp_type=gelu"]),
    (["model.hidden_activation=gelu_tanh"], ["model.mlp_type=gelu_tanh"]),
    (["model.num_kv_heads=2", "model.attention_type=gqa"], ["model.num_kv_heads=2", "model.attention_type=mha"]),
])
def test_old_keys_build_the_same_model_as_the_registry_keys(alias, canonical):
    a, b = make(*alias), make(*canonical)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_aliases_resolve_to_one_key_in_the_saved_config(tmp_path):
    cfg = load_config(f"{ROOT}/configs/base_small.yaml", ["--model.use_rope", "false"])
    assert (cfg.model.pos_encoding.type, cfg.model.use_rope) == ("learned", None)
    assert (cfg.model.mlp_type, cfg.model.hidden_activation) == ("swiglu", None)  # the file's hidden_activation: silu
    again = config_from_dict(__import__("yaml").safe_load(dump_config(cfg)))
    assert again == cfg
    # an override of either key of a pair wins over the file's value of the other
    cfg = load_config(f"{ROOT}/configs/base_small.yaml", ["--model.pos_encoding.type", "none"])
    assert cfg.model.pos_encoding.type == "none"


def test_nope_model_is_order_blind_without_its_causal_mask():
    """pos_encoding.type none: no embedding, no rotation — in one layer, the last position attends to the
    set of earlier tokens, so swapping two of them changes nothing there (with RoPE it does)."""
    model = make("model.pos_encoding.type=none", "memory.vanilla_mode=true", "model.num_layers=1").eval()
    rope = make("memory.vanilla_mode=true", "model.num_layers=1").eval()
    ids = IDS[:1]
    swapped = ids.clone()
    swapped[0, [0, 1]] = ids[0, [1, 0]]
    with torch.no_grad():
        assert (model(ids).logits[0, -1] - model(swapped).logits[0, -1]).abs().max() < 1e-6
        assert (rope(ids).logits[0, -1] - rope(swapped).logits[0, -1]).abs().max() > 1e-5


# ------------------------------------------------------------------ a new position type
class ToyDistanceBias(PositionEncoding):
    """A position type using the attention-bias hook: −slope·(i − j) per head (float64 reference below)."""

    def __init__(self, model):
        super().__init__()
        self.slopes = torch.tensor([2.0 ** -(h + 1) for h in range(model.num_heads)])

    def attention_bias(self, state, ctx, num_heads, q_len, k_len):
        i = torch.arange(k_len - q_len, k_len)[:, None]
        j = torch.arange(k_len)[None, :]
        return -self.slopes[:, None, None] * (i - j).clamp(min=0).float()


def reference_forward(model, ids):
    """The model's forward written out in float64 with the toy bias added to every score."""
    m = model.model_config
    H, KV, hd = m.num_heads, m.num_kv_heads, m.hidden_dim // m.num_heads
    S = ids.shape[1]
    d = lambda t: t.detach().double()  # noqa: E731
    rms = lambda x, w: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.norm_eps) * d(w)  # noqa: E731
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(H)], dtype=torch.float64)
    dist = (torch.arange(S)[:, None] - torch.arange(S)[None, :]).double()
    bias = -slopes[:, None, None] * dist.clamp(min=0) + torch.full((S, S), -math.inf).triu(1).double()
    x = d(model.tok_embeddings.weight)[ids]
    for block in model.blocks:
        h = rms(x, block.attn_norm.weight)
        q, k, v = (h @ d(block.attn.qkv_proj.weight).T).split([H * hd, KV * hd, KV * hd], -1)
        q = q.view(*ids.shape, H, hd).transpose(1, 2)
        k = k.view(*ids.shape, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
        v = v.view(*ids.shape, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, -1)
        x = x + (p @ v).transpose(1, 2).reshape(*ids.shape, H * hd) @ d(block.attn.o_proj.weight).T
        gate, up = (rms(x, block.mlp_norm.weight) @ d(block.mlp.gate_up_proj.weight).T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ d(block.mlp.down_proj.weight).T
    return rms(x, model.norm.weight) @ d(model.lm_head.weight).T


def test_a_new_position_type_is_one_registration(registered):
    registered(POSITIONS, "toy_bias", ToyDistanceBias)
    model = make("model.pos_encoding.type=toy_bias", "memory.vanilla_mode=true").eval()
    assert isinstance(model.pos_embeddings, ToyDistanceBias)
    with torch.no_grad():
        logits = model(IDS).logits
        assert (logits.double() - reference_forward(model, IDS)).abs().max() < 1e-4
        # the bias hook also applies to cached decoding: token by token equals the full forward
        cache = model.new_cache(2, 12)
        steps = torch.cat([model(IDS[:, :5], cache=cache).logits] +
                          [model(IDS[:, i:i + 1], cache=cache).logits for i in range(5, 12)], 1)
        assert (steps - logits).abs().max() < 1e-5


# ------------------------------------------------------------------ a new attention type
class ToyNaiveAttention(nn.Module):
    """Same weights as mha, written without SDPA: proves a model picks attention by its key alone."""

    def __init__(self, model, layer_idx):
        super().__init__()
        self.heads, self.kv_heads = model.num_heads, model.num_kv_heads or model.num_heads
        self.hd = model.hidden_dim // model.num_heads
        self.qkv_proj = nn.Linear(model.hidden_dim, (self.heads + 2 * self.kv_heads) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.heads * self.hd, model.hidden_dim, bias=False)
        self.layer_idx = layer_idx

    def forward(self, x, ctx):
        B, S, _ = x.shape
        H, KV, hd = self.heads, self.kv_heads, self.hd
        q, k, v = self.qkv_proj(x).split([H * hd, KV * hd, KV * hd], -1)
        q, k, v = (t.view(B, S, -1, hd).transpose(1, 2) for t in (q, k, v))
        q, k = ctx.encoding.rotate(q, k, ctx.encoding_state, ctx)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + torch.full((S, S), -math.inf).triu(1)
        return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H * hd))


def test_a_new_attention_type_is_one_registration(registered):
    built = []
    registered(ATTENTION, "toy_naive", lambda m, i: (built.append(i), ToyNaiveAttention(m, i))[1])
    toy, mha = make("model.attention_type=toy_naive"), make()
    assert built == [0, 1, 2, 3]  # constructed with (model_config, layer_idx), one per layer
    assert toy.state_dict().keys() == mha.state_dict().keys()
    toy.load_state_dict(mha.state_dict())
    ids = IDS
    assert (toy(ids).logits - mha(ids).logits).abs().max() < 1e-5  # memory, RoPE and MLP reached it unchanged


# ------------------------------------------------------------------ a new block branch
class ToyGateBranch(ResidualBranch):
    """Adds W_o · tanh(norm-free x) after the MLP and counts decoding steps in its per-layer state."""

    slot = "after_mlp"
    param_group = "toy"

    def __init__(self, dim):
        super().__init__()
        self.inner = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def output_layers(self):
        return [self.out]

    def forward(self, x, ctx):
        cache = ctx.layer_cache()
        if cache is not None:
            cache.state["toy_steps"] = cache.state.get("toy_steps", 0) + 1
        return self.out(torch.tanh(self.inner(x)))


def test_a_new_branch_gets_its_slot_identity_init_and_decoding_state(registered):
    registered(BRANCHES, "toy", lambda model, mem, i: ToyGateBranch(model.hidden_dim) if i % 2 else None)
    cfg = tiny_config("memory.vanilla_mode=true")
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    torch.manual_seed(0)
    with_branch = build_model(cfg).eval()
    assert [b.toy is not None for b in with_branch.blocks] == [False, True, False, True]
    assert all(torch.count_nonzero(b.toy.out.weight) == 0 for b in with_branch.blocks[1::2])  # wo_init_zero
    assert any(torch.count_nonzero(b.toy.inner.weight) > 0 for b in with_branch.blocks[1::2])
    with_branch.load_state_dict({**with_branch.state_dict(), **plain.state_dict()})
    with torch.no_grad():
        assert torch.equal(with_branch(IDS).logits, plain(IDS).logits)  # a zeroed branch starts as identity
        with_branch.blocks[1].toy.out.weight.normal_()
        assert not torch.allclose(with_branch(IDS).logits, plain(IDS).logits)
        cache = with_branch.new_cache(2, 12)
        with_branch(IDS[:, :4], cache=cache)
        with_branch(IDS[:, 4:5], cache=cache)
    assert {i: c.state.get("toy_steps") for i, c in cache.layers.items()} == {0: None, 1: 2, 2: None, 3: 2}
    assert not any(p is q for p in with_branch.memory_parameters() for q in with_branch.blocks[1].toy.parameters())


# ------------------------------------------------------------------ decoding cache and checkpointing
def test_decoding_cache_holds_each_layers_kv_and_memory_state():
    model = make().eval()
    cache = model.new_cache(2, 12, capacity=4)
    with torch.no_grad():
        model(IDS[:, :6], cache=cache)
    assert cache.length == 6 and sorted(cache.layers) == [0, 1, 2, 3]
    layer = cache.layer(2)
    assert layer.keys.shape == (2, 2, 8, 8) and layer.length == 6  # grown from 4 to 8 rows
    # the cached keys are the model's own keys of those tokens (RoPE applied), recomputed independently
    block = model.blocks[2]
    with torch.no_grad():
        x = model.tok_embeddings(IDS[:, :6])
        for b in model.blocks[:2]:
            x = b(x, _ctx(model, 6))
        k = block.attn.qkv_proj(block.attn_norm(x))[..., 32:48].view(2, 6, 2, 8).transpose(1, 2)
        k = model.pos_embeddings.rotate(k, k, model.pos_embeddings.prepare(torch.arange(6), k.dtype), None)[0]
    assert torch.allclose(layer.keys[:, :, :6], k, atol=1e-6)
    assert set(layer.state) == {"memory_kv"}  # the memory branch projected the bank once, for the generation


def _ctx(model, S):
    from megamem.model.context import forward_context

    banks = {i: bank() for i, bank in enumerate(model.banks)}
    return forward_context(model.pos_embeddings, S, torch.device("cpu"), torch.float32, banks=banks).at(0)


def test_block_checkpointing_is_applied_from_outside_and_recomputes():
    model = make().train()
    names = list(model.state_dict())
    calls = []
    for block in model.blocks:
        block.mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # (a recompute stops inside the MLP)
    model(IDS, labels=IDS).loss.backward()
    plain_calls, calls[:] = len(calls), []
    set_activation_checkpointing(model, True)
    assert activation_checkpointing(model) and list(model.state_dict()) == names
    model(IDS, labels=IDS).loss.backward()
    assert len(calls) == 2 * plain_calls  # every block's forward ran again in backward
    set_activation_checkpointing(model, False)
    calls[:] = []
    model(IDS, labels=IDS).loss.backward()
    assert not activation_checkpointing(model) and len(calls) == plain_calls


def test_unknown_part_names_are_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model.attention_type: 'linear' is not available; valid: mha, mla, gqa, "
                                          r"standard"):
        build_model(tiny_config("model.attention_type=linear"))
