"""Positional encodings rope_ntk, alibi, pi_spiral, hybrid and sliding-window attention, each against an
independent reference: plain RoPE, transformers' dynamic-NTK function, the ALiBi paper's slope rule,
high-precision phases (mpmath), a hand-written masked attention, and the model's own full forward.
"""
import math

import pytest
import torch

from megamem.config import ModelConfig, PositionEncodingConfig
from megamem.model import build_model
from megamem.model.decoding_cache import DecodingCache
from megamem.model.positions.alibi import alibi_slopes
from megamem.model.positions.hybrid import hybrid_weight
from megamem.model.positions.rope_ntk import NTKRotaryPositions
from megamem.model.positions.rope import RotaryPositions
from megamem.model.positions.spiral import irrational_fraction, spiral_embedding, weyl_turns

from conftest import assert_future_never_changes_the_past, decode_in_chunks, tiny_config

torch.set_num_threads(1)
IDS = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))
ENCODINGS = {
    "rope": [], "learned": ["model.pos_encoding.type=learned"], "none": ["model.pos_encoding.type=none"],
    "rope_ntk": ["model.pos_encoding.type=rope_ntk", "model.pos_encoding.ntk_factor=4"],
    "rope_ntk_dynamic": ["model.pos_encoding.type=rope_ntk", "model.pos_encoding.ntk_factor=2",
                         "model.pos_encoding.ntk_scaling=dynamic", "model.pos_encoding.ntk_original_max_seq_len=48"],
    "alibi": ["model.pos_encoding.type=alibi"],
    "alibi_6_heads": ["model.pos_encoding.type=alibi", "model.hidden_dim=48", "model.num_heads=6",
                      "model.num_kv_heads=3"],
    "pi_spiral": ["model.pos_encoding.type=pi_spiral"],
    "pi_spiral_prng": ["model.pos_encoding.type=pi_spiral", "model.pos_encoding.irrational=prng"],
    "hybrid": ["model.pos_encoding.type=hybrid", "model.pos_encoding.hybrid_K=16",
               "model.pos_encoding.transition_width=4"],
    "hybrid_hard": ["model.pos_encoding.type=hybrid", "model.pos_encoding.hybrid_K=16",
                    "model.pos_encoding.transition_width=0", "model.pos_encoding.irrational=e"],
}
WINDOWED = {f"{name}+window": over + ["model.window_size=7"] for name, over in ENCODINGS.items()
            if name in ("rope", "alibi_6_heads", "hybrid", "pi_spiral", "rope_ntk")}
ALL = {**ENCODINGS, **WINDOWED}


def make(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_config("memory.wo_init_zero=false", *overrides)).eval()


def model_config(**pos):
    return ModelConfig(hidden_dim=64, num_heads=4, max_seq_len=4096, pos_encoding=PositionEncodingConfig(**pos))


# ------------------------------------------------------------------------------------ rope_ntk
def test_ntk_factor_1_is_rope_bitwise():
    positions = torch.arange(0, 4096, 7)
    rope = RotaryPositions(model_config(type="rope")).prepare(positions, torch.float32)
    for scaling in ("static", "dynamic"):
        ntk = NTKRotaryPositions(model_config(type="rope_ntk", ntk_factor=1.0, ntk_scaling=scaling))
        ours = ntk.prepare(positions, torch.float32)
        assert torch.equal(ours[0], rope[0]) and torch.equal(ours[1], rope[1])
    a, b = make(), make("model.pos_encoding.type=rope_ntk", "model.pos_encoding.ntk_factor=1")
    assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_static_ntk_base():
    ntk = NTKRotaryPositions(model_config(type="rope_ntk", ntk_factor=8.0, rope_base=500.0))
    base = 500.0 * 8.0 ** (16 / 14)  # head_dim 16
    assert torch.equal(ntk.inv_freq, 1.0 / base ** (torch.arange(0, 16, 2).float() / 16))


def transformers_dynamic_rotary(head_dim, factor, original, theta=10000.0):
    """transformers' Llama rotary module with rope type dynamic (its forward recomputes the frequencies)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=original,
                     rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": theta})
    return LlamaRotaryEmbedding(hf)


@pytest.mark.parametrize("seq_len", [100, 1000, 1001, 3000, 100_003])
def test_dynamic_ntk_matches_transformers(seq_len):
    """The cos/sin of transformers' own forward (frequencies recomputed from an int64 length in float32),
    bit for bit, at the trained length and far beyond it; and its Python-float function at init."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_dynamic_ntk_parameters

    ntk = NTKRotaryPositions(ModelConfig(hidden_dim=64, num_heads=4, max_seq_len=200_000, pos_encoding=PositionEncodingConfig(
        type="rope_ntk", ntk_factor=3.3, ntk_scaling="dynamic", ntk_original_max_seq_len=1000)))
    positions = torch.arange(seq_len)
    cos, sin = ntk.prepare(positions, torch.float32)
    ref_cos, ref_sin = transformers_dynamic_rotary(16, 3.3, 1000)(torch.zeros(1), positions[None])
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=1000,
                     rope_parameters={"rope_type": "dynamic", "factor": 3.3, "rope_theta": 10000.0})
    assert torch.equal(ntk.inv_freq, _compute_dynamic_ntk_parameters(hf)[0])  # init: seq_len = L0


# --------------------------------------------------------------------------------------- alibi
def paper_slopes(n):
    """Press et al.'s get_slopes, written out."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio ** i for i in range(n)]
    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest_power_of_2) + paper_slopes(2 * closest_power_of_2)[0::2][:n - closest_power_of_2]


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)] == paper_slopes(8)
    twelve = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in (0, 1, 2, 3)]
    assert alibi_slopes(12) == paper_slopes(12)
    assert alibi_slopes(12) == pytest.approx(twelve, rel=1e-15)


def test_alibi_bias_in_the_model_equals_a_hand_written_attention():
    model = make("model.pos_encoding.type=alibi", "model.num_layers=1")
    ids = IDS[:, :9]
    attn, x = model.blocks[0].attn, None
    captured = {}
    attn.register_forward_hook(lambda m, a, out: captured.update(x=a[0], out=out))
    model(ids)
    x = captured["x"]
    B, S, _ = x.shape
    q, k, v = attn.qkv_proj(x).split([32, 16, 16], -1)
    q = q.view(B, S, 4, 8).transpose(1, 2)
    k = k.view(B, S, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = v.view(B, S, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    slopes = torch.tensor(paper_slopes(4))
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) - slopes[:, None, None] * (i - j)
    scores = scores.masked_fill(j > i, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, 32)
    torch.testing.assert_close(captured["out"], attn.o_proj(y), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- pi_spiral
@pytest.mark.parametrize("name", ["pi", "e", "sqrt2", "phi"])
def test_spiral_phases_are_exact_at_large_positions(name):
    import mpmath

    mpmath.mp.dps = 60
    alpha = {"pi": mpmath.pi, "e": mpmath.e, "sqrt2": mpmath.sqrt(2), "phi": (1 + mpmath.sqrt(5)) / 2}[name]
    positions = torch.tensor([0, 1, 113, 10 ** 6, 10 ** 6 + 7, 123456789, 10 ** 9, 2 ** 31 - 1])
    turns = weyl_turns(positions, irrational_fraction(name), harmonics=3)
    for row, n in enumerate(positions.tolist()):
        for k in (1, 2, 3):
            reference = float(mpmath.frac(k * n * alpha))
            error = abs(turns[row, k - 1].item() - reference)
            assert min(error, 1 - error) < 1e-12, (name, n, k)


def test_prng_phase_is_reproducible_and_the_embedding_has_unit_norm():
    assert irrational_fraction("prng") == irrational_fraction("prng") != irrational_fraction("pi")
    positions = torch.tensor([0, 5, 10 ** 6])
    e = spiral_embedding(positions, irrational_fraction("pi"), 8, torch.float64)
    phi = 2 * math.pi * ((10 ** 6 * 3.14159265358979323846264338327950288) % 1)  # float64 is close enough here
    expected = math.sqrt(2 / 8) * torch.tensor([math.cos(k * phi) for k in (1, 2, 3, 4)] +
                                               [math.sin(k * phi) for k in (1, 2, 3, 4)], dtype=torch.float64)
    torch.testing.assert_close(e[2], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------- hybrid
def test_hybrid_with_hard_switch_is_rope_bitwise_below_K():
    rope = make()
    hard = make("model.pos_encoding.type=hybrid", "model.pos_encoding.hybrid_K=48",
                "model.pos_encoding.transition_width=0")
    assert torch.equal(rope(IDS).logits, hard(IDS).logits)  # all 40 positions below K
    straddle = make("model.pos_encoding.type=hybrid", "model.pos_encoding.hybrid_K=20",
                    "model.pos_encoding.transition_width=0")
    a, b = rope(IDS).logits, straddle(IDS).logits
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


def test_hybrid_weight_and_rotation_fade():
    w = hybrid_weight(torch.tensor([0, 99, 100, 5000]), 100, 0)
    assert w.tolist() == [0.0, 0.0, 1.0, 1.0]
    w = hybrid_weight(torch.tensor([100, 110]), 100, 10)
    assert w.tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-1))])
    enc = build_model(tiny_config("model.pos_encoding.type=hybrid", "model.pos_encoding.hybrid_K=10",
                                  "model.pos_encoding.transition_width=0")).pos_embeddings
    cos, sin = enc.prepare(torch.arange(8, 14), torch.float32)
    assert torch.equal(cos[2:], torch.ones_like(cos[2:])) and torch.equal(sin[2:], torch.zeros_like(sin[2:]))
    x = torch.zeros(1, 6, 32)
    e = enc.embed(x, torch.arange(8, 14))
    assert torch.equal(e[0, :2], x[0, :2])
    torch.testing.assert_close(e[0, 2:], spiral_embedding(torch.arange(10, 14), irrational_fraction("pi"), 32,
                                                          torch.float32))


# -------------------------------------------------------------- every encoding, with and without window
@pytest.mark.parametrize("name", list(ALL))
def test_future_tokens_never_change_the_past(name):
    assert_future_never_changes_the_past(make(*ALL[name]), IDS, 25, 61)


@pytest.mark.parametrize("name", list(ALL))
def test_kv_cache_decoding_equals_the_full_forward(name):
    model = make(*ALL[name])
    ids = IDS[:, :40] if "dynamic" not in name else IDS[:, :48]  # dynamic: equal while L <= L0 (48)
    full = model(ids).logits
    for chunks in ([1] * ids.shape[1], [5, 1, 9, 3, 12, 10]):
        cached = decode_in_chunks(model, ids, chunks, DecodingCache(max_len=64))
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_dynamic_ntk_beyond_L0_uses_the_base_of_the_current_length():
    """A decoding step at positions 50..55 (L = 56 > L0 = 48) rotates as transformers' forward does there."""
    model = make(*ENCODINGS["rope_ntk_dynamic"])
    cos, sin = model.pos_embeddings.prepare(torch.arange(50, 56), torch.float32)
    ref_cos, ref_sin = transformers_dynamic_rotary(8, 2.0, 48)(torch.zeros(1), torch.arange(50, 56)[None])
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    from megamem.model.positions.rope import rope_inv_freq
    from megamem.model.positions.rope_ntk import dynamic_ntk_base
    freqs = torch.arange(50, 56).float()[:, None] * rope_inv_freq(8, dynamic_ntk_base(10000.0, 2.0, 8, 56, 48))[None]
    torch.testing.assert_close(cos, torch.cat((freqs, freqs), -1).cos(), rtol=0, atol=1e-6)  # the formula in float64


@pytest.mark.parametrize("name", ["rope", "alibi", "pi_spiral", "hybrid", "rope+window", "alibi_6_heads+window"])
def test_packed_documents_do_not_see_each_other(name):
    model = make(*ALL[name])
    ids = IDS[:1, :30]
    doc = torch.tensor([[0] * 13 + [1] * 17])
    packed = model(ids, document_ids=doc).logits
    other = ids.clone()
    other[:, :13] = (other[:, :13] + 3) % 61  # a different first document
    assert torch.equal(packed[:, 13:], model(other, document_ids=doc).logits[:, 13:])
    torch.testing.assert_close(packed[:, :13], model(ids[:, :13]).logits, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- window
def test_window_equals_a_hand_written_banded_mask():
    model = make("model.window_size=5", "model.num_layers=1")
    attn, captured = model.blocks[0].attn, {}
    attn.register_forward_hook(lambda m, a, out: captured.update(x=a[0], out=out))
    model(IDS[:, :16])
    x = captured["x"]
    B, S, _ = x.shape
    q, k, v = attn.qkv_proj(x).split([32, 16, 16], -1)
    q, k = q.view(B, S, 4, 8).transpose(1, 2), k.view(B, S, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = v.view(B, S, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    cos, sin = model.pos_embeddings.prepare(torch.arange(S), torch.float32)
    rot = lambda t: t * cos + torch.cat((-t[..., 4:], t[..., :4]), -1) * sin  # noqa: E731
    q, k = rot(q), rot(k)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill((j > i) | (i - j >= 5), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, 32)
    torch.testing.assert_close(captured["out"], attn.o_proj(y), rtol=1e-5, atol=1e-6)


def test_windowed_decoding_keeps_the_cache_flat():
    model = make("model.window_size=6", "model.pos_encoding.type=alibi")
    full = model(IDS).logits
    cache, out, sizes = DecodingCache(max_len=64), [], []
    for t in range(IDS.shape[1]):
        out.append(model(IDS[:, t:t + 1], cache=cache).logits)
        sizes.append(sum(c.keys.numel() + c.values.numel() for c in cache.layers.values()))
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-5, atol=1e-5)
    assert sizes[5:] == [sizes[5]] * (len(sizes) - 5) and sizes[5] == 4 * 2 * (2 * 2 * 6 * 8)
    assert [c.keys.shape[2] for c in cache.layers.values()] == [6] * 4


def test_a_cache_shorter_than_the_window_holds_only_its_tokens():
    """max_len < window: the ring has max_len slots (not window), decodes as the full forward, refuses more."""
    model = make("model.window_size=32")
    ids = IDS[:, :20]
    cache = DecodingCache(max_len=20)
    out = [model(ids[:, :7], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(out, 1), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert [c.keys.shape[2] for c in cache.layers.values()] == [20] * 4
    with pytest.raises(ValueError, match="KV cache holds 20 tokens; cannot append up to 21"):
        model(ids[:, :1], cache=cache)


def test_window_longer_than_the_sequence_is_full_attention():
    torch.testing.assert_close(make("model.window_size=64")(IDS).logits, make()(IDS).logits, rtol=1e-5, atol=1e-6)


def test_generate_with_a_window_matches_greedy_full_forwards():
    model = make("model.window_size=5", "model.pos_encoding.type=hybrid", "model.pos_encoding.hybrid_K=8",
                 "model.pos_encoding.transition_width=2")
    out = model.generate(IDS[:, :6], max_new_tokens=10)
    ids = IDS[:, :6]
    for _ in range(10):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


# --------------------------------------------------------------------------------------- HF export
@pytest.mark.parametrize("name", ["rope_ntk", "rope_ntk_dynamic", "alibi_6_heads", "pi_spiral_prng", "hybrid",
                                  "alibi_6_heads+window"])
def test_remote_code_export_rebuilds_the_buffers(tmp_path, name):
    """The remote-code folder loads on the meta device and recomputes every non-persistent buffer."""
    from transformers import AutoModelForCausalLM

    from megamem.hf.folder import write_megamem_folder
    from megamem.hf.llama import llama_incompatibilities

    cfg = tiny_config("memory.wo_init_zero=false", *ALL[name])
    assert llama_incompatibilities(cfg)  # never exported as native Llama
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    write_megamem_folder(str(tmp_path), model.state_dict(), cfg, "fp32")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    ours = dict(model.pos_embeddings.named_buffers())
    theirs = dict(hf.model.pos_embeddings.named_buffers())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, model(IDS).logits)


# ------------------------------------------------------------------------------------------ config
def test_rope_base_and_max_seq_len_repeat_the_model_keys():
    cfg = tiny_config("model.pos_encoding.rope_base=500.0", "model.pos_encoding.max_seq_len=96")
    assert (cfg.model.rope_theta, cfg.model.max_seq_len) == (500.0, 96)
    assert (cfg.model.pos_encoding.rope_base, cfg.model.pos_encoding.max_seq_len) == (None, None)
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(0)
    b = build_model(tiny_config("model.rope_theta=500.0", "model.max_seq_len=96"))
    assert torch.equal(a(IDS).logits, b(IDS).logits)
    assert build_model(tiny_config("model.rope_theta=500.0")).pos_embeddings.theta == 500.0
    assert RotaryPositions(ModelConfig(hidden_dim=32, num_heads=4,
                                       pos_encoding=PositionEncodingConfig(rope_base=77.0))).theta == 77.0


def test_flops_count_the_window_context():
    from megamem.model.flops import flops_per_token

    full, windowed = make("model.num_layers=1"), make("model.num_layers=1", "model.window_size=8")
    # attention FLOPs: 6·2·layers·context·hidden; average context over 32 tokens: 16 full, (Σ min(i+1, 8) ≈ 8·(32 − 4))/32
    assert flops_per_token(full, 32) - flops_per_token(windowed, 32) == pytest.approx(12 * 32 * (16 - 8 * 28 / 32))


def test_alibi_slopes_stay_exact_fp32_when_the_model_is_cast():
    model = make("model.pos_encoding.type=alibi", "model.hidden_dim=48", "model.num_heads=12",
                 "model.num_kv_heads=4").to(torch.bfloat16)
    assert model.pos_embeddings.slopes.dtype == torch.float32
    assert torch.equal(model.pos_embeddings.slopes, torch.tensor(paper_slopes(12), dtype=torch.float32))
