"""Multi-head latent attention (model.attention_type: mla) against independent references: a hand-written
MLA (explicit softmax, pairwise RoPE), transformers' DeepSeek-V3 attention with copied weights, the model's
own full forward for every decoding path (also after weights change), and hand counts of cache bytes/FLOPs."""
import math

import pytest
import torch

from megamem.config import ConfigError
from megamem.model import build_model
from megamem.model.attention.mla import CACHE_KEY, MultiHeadLatentAttention
from megamem.model.context import ForwardContext
from megamem.model.decoding_cache import DecodingCache
from megamem.model.positions import POSITIONS, PositionEncoding

from conftest import tiny_config

DC, DR, DN, DV = 12, 6, 8, 10  # kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim
MLA = ("model.attention_type=mla", "model.num_kv_heads=null", f"model.mla_config.kv_lora_rank={DC}",
       f"model.mla_config.qk_rope_head_dim={DR}", f"model.mla_config.qk_nope_head_dim={DN}",
       f"model.mla_config.v_head_dim={DV}")
Q_LORA = {"plain-q": (), "low-rank-q": ("model.mla_config.q_lora_rank=16",)}


def mla_cfg(*extra):
    return tiny_config(*MLA, *extra)


def module(*extra, seed=0):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(mla_cfg(*extra).model, 0).eval()  # nn.Linear's own (wide) init


def rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_pairs(x, positions, theta):
    """RoPE written out per pair (i, i + d/2), angle = position · theta^(-2i/d)."""
    d = x.shape[-1]
    half = d // 2
    angle = positions.double()[:, None] * theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def reference(attn, x, positions, allowed, rotate=True, theta=10000.0):
    """MLA from its equations; allowed: [S, S] or [B, 1, S, S] bool."""
    B, S, _ = x.shape
    H = attn.num_heads
    if attn.q_lora_rank:
        q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight) @ attn.q_b_proj.weight.T
    else:
        q = x @ attn.q_proj.weight.T
    q = q.view(B, S, H, DN + DR)
    c, kr = (x @ attn.kv_a_proj_with_mqa.weight.T).split([DC, DR], dim=-1)
    c = rms(c, attn.kv_a_layernorm.weight)
    qr = q[..., DN:]
    if rotate:
        qr = rope_pairs(qr.transpose(1, 2), positions, theta).transpose(1, 2)
        kr = rope_pairs(kr, positions, theta)
    kv = (c @ attn.kv_b_proj.weight.T).view(B, S, H, DN + DV)
    scores = torch.einsum("bshd,bthd->bhst", q[..., :DN], kv[..., :DN]) + torch.einsum("bshd,btd->bhst", qr, kr)
    scores = (scores / math.sqrt(DN + DR)).masked_fill(~allowed, float("-inf"))
    o = torch.einsum("bhst,bthv->bshv", scores.softmax(-1), kv[..., DN:]).reshape(B, S, H * DV)
    return o @ attn.o_proj.weight.T


def causal(S):
    return torch.ones(S, S, dtype=torch.bool).tril()


# ----------------------------------------------------------------------------- the attention itself
@pytest.mark.parametrize("q", list(Q_LORA))
def test_naive_and_absorbed_equal_the_equations(q):
    attn = module(*Q_LORA[q])
    x, pos = torch.randn(2, 9, 32), torch.arange(9)
    ref = reference(attn, x, pos, causal(9))
    with torch.no_grad():
        naive = attn(x, ForwardContext(positions=pos), absorbed=False)
        absorbed = attn(x, ForwardContext(positions=pos), absorbed=True)
        default = attn(x, ForwardContext(positions=pos))
    assert (naive - ref).abs().max() <= 1e-5 and (absorbed - ref).abs().max() <= 1e-5
    assert (absorbed - naive).abs().max() <= 1e-5 and torch.equal(default, naive)  # training/prefill: naive
    # decoding through the latent cache (absorbed after the first chunk) gives the same rows
    cache, rows = DecodingCache(9, capacity=2), []
    with torch.no_grad():
        for a, b in ((0, 4), (4, 5), (5, 8), (8, 9)):
            rows.append(attn(x[:, a:b], ForwardContext(positions=torch.arange(a, b), cache=cache)))
            cache.advance(b - a)
    assert (torch.cat(rows, 1) - ref).abs().max() <= 1e-5


def test_document_mask_and_positions_none():
    attn = module("model.pos_encoding.type=none")
    assert not attn.rotate
    x, pos = torch.randn(2, 8, 32), torch.arange(8)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    allowed = ((doc[:, :, None] == doc[:, None, :]) & causal(8))[:, None]
    ref = reference(attn, x, pos, allowed, rotate=False)
    with torch.no_grad():
        for absorbed in (False, True):
            out = attn(x, ForwardContext(positions=pos, document_mask=allowed), absorbed=absorbed)
            assert (out - ref).abs().max() <= 1e-5


def test_rope_theta_defaults_to_the_model_and_can_differ():
    assert module("model.rope_theta=500").theta == 500.0
    attn = module("model.mla_config.rope_theta=50")
    x, pos = torch.randn(1, 6, 32), torch.arange(6)
    with torch.no_grad():
        out = attn(x, ForwardContext(positions=pos))
    assert (out - reference(attn, x, pos, causal(6), theta=50.0)).abs().max() <= 1e-5


def test_an_encoding_that_rotates_full_heads_is_refused(monkeypatch):
    class FullRotation(PositionEncoding):
        def __init__(self, model):
            super().__init__()

        def rotate(self, q, k, state, ctx):
            return q, k

    monkeypatch.setitem(POSITIONS.entries, "rotating", FullRotation)
    with pytest.raises(ConfigError, match=r"^model.pos_encoding.type: 'rotating' rotates queries/keys at the model's "
                                          r"head width, which attention_type mla does not have; use rope"):
        build_model(mla_cfg("model.pos_encoding.type=rotating"))


# ------------------------------------------------------------------------- transformers' DeepSeek-V3
@pytest.mark.parametrize("interleave", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("q", list(Q_LORA))
def test_equals_transformers_deepseek_v3_attention(q, interleave):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    ours = module(*Q_LORA[q])
    config = DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=DC,
                              q_lora_rank=16 if q == "low-rank-q" else None, qk_rope_head_dim=DR,
                              qk_nope_head_dim=DN, v_head_dim=DV, rope_interleave=interleave, rms_norm_eps=1e-6,
                              max_position_embeddings=64, attention_bias=False, attn_implementation="eager")
    assert config.rope_parameters["rope_type"] == "default" and config.rope_parameters["rope_theta"] == 10000.0
    theirs = DeepseekV3Attention(config, 0).eval()
    state = ours.state_dict()
    if interleave:  # HF's rope rows in interleaved order: its row perm[j] is our (rotate-half) row j
        perm = torch.cat([torch.arange(0, DR, 2), torch.arange(1, DR, 2)])
        inv = torch.argsort(perm)
        name = "q_b_proj.weight" if q == "low-rank-q" else "q_proj.weight"
        w = state[name].view(4, DN + DR, -1).clone()
        w[:, DN:] = w[:, DN:][:, inv]
        state[name] = w.reshape(state[name].shape)
        w = state["kv_a_proj_with_mqa.weight"].clone()
        w[DC:] = w[DC:][inv]
        state["kv_a_proj_with_mqa.weight"] = w
    theirs.load_state_dict(state, strict=True)
    x, pos = torch.randn(2, 11, 32), torch.arange(11)
    cos, sin = DeepseekV3RotaryEmbedding(config)(x, pos[None])
    mask = torch.zeros(11, 11).masked_fill(~causal(11), float("-inf"))[None, None]
    with torch.no_grad():
        expected = theirs(x, (cos, sin), mask)[0]
        naive = ours(x, ForwardContext(positions=pos), absorbed=False)
        absorbed = ours(x, ForwardContext(positions=pos), absorbed=True)
    assert (naive - expected).abs().max() <= 1e-5
    assert (absorbed - expected).abs().max() <= 1e-5
