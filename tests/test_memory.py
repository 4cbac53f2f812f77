import math

import pytest
import torch

from megamem.memory.bank import FactorizedMemoryBank, QuantizedMemoryBank, dequantize_rows, quantize_rows
from megamem.memory.cross_attention import MemoryCrossAttention
from megamem.model import build_model
from megamem.config import ModelConfig
from megamem.model.attention import build_attention
from megamem.model.context import ForwardContext

from conftest import tiny_config


def naive_attention(q, k, v, causal):
    """q [B,H,S,hd], k/v [B,H,T,hd], explicit softmax."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        S, T = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(S, T, dtype=torch.bool).tril(T - S), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_memory_cross_attention_matches_dense_reference(heads, kv_heads):
    torch.manual_seed(0)
    attn = MemoryCrossAttention(32, 24, heads, kv_heads)
    torch.nn.init.normal_(attn.o_proj.weight, std=0.1)
    x, memory = torch.randn(3, 5, 32), torch.randn(17, 24)
    hd, rep = 32 // heads, heads // kv_heads
    q = (x @ attn.q_proj.weight.t()).view(3, 5, heads, hd).transpose(1, 2)
    k = (memory @ attn.k_proj.weight.t()).view(17, kv_heads, hd).transpose(0, 1)
    v = (memory @ attn.v_proj.weight.t()).view(17, kv_heads, hd).transpose(0, 1)
    k = k.repeat_interleave(rep, 0).expand(3, -1, -1, -1)  # every sequence reads the same bank
    v = v.repeat_interleave(rep, 0).expand(3, -1, -1, -1)
    ref = naive_attention(q, k, v, causal=False).transpose(1, 2).reshape(3, 5, 32) @ attn.o_proj.weight.t()
    assert torch.allclose(attn(x, memory), ref, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_self_attention_matches_naive_reference(kv_heads):
    torch.manual_seed(0)
    attn = build_attention(ModelConfig(hidden_dim=32, num_heads=4, num_kv_heads=kv_heads, use_flash_attention=False), 0)
    x = torch.randn(2, 9, 32)
    q, k, v = (x @ attn.qkv_proj.weight.t()).split([32, 8 * kv_heads, 8 * kv_heads], -1)
    q = q.view(2, 9, 4, 8).transpose(1, 2)
    k = k.view(2, 9, kv_heads, 8).transpose(1, 2).repeat_interleave(4 // kv_heads, 1)
    v = v.view(2, 9, kv_heads, 8).transpose(1, 2).repeat_interleave(4 // kv_heads, 1)
    ref = naive_attention(q, k, v, causal=True).transpose(1, 2).reshape(2, 9, 32) @ attn.o_proj.weight.t()
    assert torch.allclose(attn(x, ForwardContext()), ref, atol=1e-5)


def test_factorized_bank_is_a_times_b_and_init_std():
    torch.manual_seed(0)
    bank = FactorizedMemoryBank(4096, 64, 16, init_std=0.02)
    assert torch.equal(bank(), bank.A @ bank.B.t())
    assert abs(bank().std().item() - 0.02) < 0.002


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rows_roundtrip(bits):
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    codes, scales = quantize_rows(x, bits)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape == (50, 16 if bits == 8 else 8)
    back = dequantize_rows(codes, scales, bits)
    assert ((back - x).abs() <= scales / 2 + 1e-6).all()  # error at most half a step per row
    again, _ = quantize_rows(back, bits)
    assert torch.equal(again, codes)  # dequantised values are exactly representable


def test_quantized_bank_from_float_and_trainable_scales():
    torch.manual_seed(0)
    dense = torch.randn(10, 8)
    bank = QuantizedMemoryBank.from_float(dense, 8)
    assert (bank() - dense).abs().max() < dense.abs().max() / 127
    assert [n for n, _ in bank.named_parameters()] == ["scales"]
    bank().sum().backward()
    assert bank.scales.grad is not None and bank.scales.grad.abs().sum() > 0


def _bank_params(kind, n, d, r):
    return {"full": n * d, "factorized": n * r + d * r, "reduced_dim": n * r, "int8": n, "int4": n}[kind]


@pytest.mark.parametrize("kind,overrides", [
    ("full", []),
    ("factorized", ["memory.use_low_rank_memory=true", "memory.memory_rank=8"]),
    ("reduced_dim", ["memory.use_low_rank_memory=true", "memory.memory_rank=8", "memory.low_rank_mode=reduced_dim"]),
    ("int8", ["memory.quantize_memory=true"]),
    ("int4", ["memory.quantize_memory=true", "memory.memory_quant_bits=4"]),
])
@pytest.mark.parametrize("sharing,banks", [("shared", 1), ("per_layer", 3), ("every_k_layers", 2)])
@pytest.mark.parametrize("layout", ["A", "B"])
def test_parameter_counts_closed_form(kind, overrides, sharing, banks, layout):
    V, d, L, I, H, KV, N, r, hd = 61, 32, 4, 48, 4, 2, 12, 8, 8
    cfg = tiny_config(*overrides, f"memory.memory_sharing={sharing}", "memory.memory_sharing_k=2",
                      "memory.memory_layer_placement=last_k", "memory.memory_layer_k=3",
                      f"memory.memory_block_variant={layout}", "memory.memory_num_kv_heads=2")
    model = build_model(cfg)
    bank_dim = r if kind == "reduced_dim" else d
    block = 2 * d + d * (H + 2 * KV) * hd + d * d + 3 * d * I
    branch = d + d * d + 2 * bank_dim * KV * hd + d * d + ((d + 3 * d * I) if layout == "B" else 0)
    memory = banks * _bank_params(kind, N, d, r) + 3 * branch
    counts = model.parameter_counts()
    assert counts["memory"] == memory
    assert counts["total"] == 2 * V * d + L * block + d + memory
    assert counts["trainable"] == counts["total"]
    assert [b["layers"] for b in counts["banks"]] == {1: [[1, 2, 3]], 3: [[1], [2], [3]], 2: [[1, 2], [3]]}[banks]


def test_low_rank_projection_counts():
    cfg = tiny_config("memory.use_low_rank_projections=true", "memory.projection_rank=4",
                      "memory.memory_layer_placement=first_k", "memory.memory_layer_k=1")
    d, r, N, kvd = 32, 4, 12, 4 * 8  # memory K/V heads default to the memory heads (4)
    branch = d + (d * r + r * d) + 2 * (d * r + r * kvd) + (d * r + r * d)
    assert build_model(cfg).parameter_counts()["memory"] == N * d + branch
