"""Sequence routing's batched formulations (one projection of the batch's distinct chapters, or
absorbed) against the per-sequence computation they replace, in float64: forward and every
gradient, with chapters repeated across sequences, shared chapters, GQA, low-rank projections,
and row-sparse bank gradients."""
import math

import pytest
import torch

from megamem.memory.chapters import ChapterMemoryAttention

from conftest import tiny_config

C, T, D, BANK_D, B, S = 6, 4, 32, 24, 5, 3


def make_attn(form, *overrides, low_rank=False, heads=(4, 2)):
    torch.manual_seed(0)
    cfg = tiny_config("memory.use_chapters=true", f"memory.num_chapters={C}", f"memory.num_memory_tokens={C * T}",
                      "memory.routing_strategy_train=sequence", f"memory.sequence_routing_formulation={form}",
                      *overrides).memory
    attn = ChapterMemoryAttention(D, BANK_D, *heads, cfg, projection_rank=8 if low_rank else None)
    torch.nn.init.normal_(attn.router.weight, std=0.5)
    return attn.double()


def per_sequence(attn, x, memory):
    """The replaced computation: each sequence projects its own chapters' rows, one explicit softmax."""
    H, hd, kv = attn.num_heads, attn.head_dim, attn.num_kv_heads
    routing = attn.router(x.mean(1))
    out = []
    for b in range(x.shape[0]):
        rows = memory.view(C, T, -1)[routing.chapters[b]].flatten(0, 1)
        k = attn.k_proj(rows).view(-1, kv, hd).repeat_interleave(H // kv, 1)
        v = attn.v_proj(rows).view(-1, kv, hd).repeat_interleave(H // kv, 1)
        q = attn.q_proj(x[b]).view(-1, H, hd)
        s = torch.einsum("she,jhe->shj", q, k) / math.sqrt(hd) + routing.bias[b].double().repeat_interleave(T)
        o = torch.einsum("shj,jhe->she", s.softmax(-1), v).reshape(x.shape[1], -1) * routing.gate[b]
        out.append(attn.o_proj(o))
    return torch.stack(out)


def grads(out, tensors):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * g).sum(), tensors, allow_unused=True)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
@pytest.mark.parametrize("form", ["projected", "absorbed"])
def test_batched_formulations_equal_per_sequence(form, heads, low_rank, sparse):
    """5 sequences × (1 shared + 2 routed) chapters of 6: chapters repeat across sequences."""
    attn = make_attn(form, "memory.top_k_chapters=2", "memory.num_shared_chapters=1",
                     "memory.routed_scaling_factor=1.3", f"memory.sparse_bank_grad={str(sparse).lower()}",
                     low_rank=low_rank, heads=heads)
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(C * T, BANK_D, dtype=torch.float64, requires_grad=True)
    chapters = attn.router(x.mean(1)).chapters
    assert torch.unique(chapters).numel() < chapters.numel()  # the union is smaller than the picks
    y, ref = attn(x, memory), per_sequence(attn, x, memory)
    assert (y - ref).abs().max() <= 1e-12
    tensors = [x, memory] + list(attn.parameters())
    for a, b in zip(grads(y, tensors), grads(ref, tensors)):
        a = a.to_dense() if a.is_sparse else a
        assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("form", ["projected", "absorbed"])
def test_sparse_bank_gradient_holds_the_union(form):
    """With sparse_bank_grad the bank's gradient is row-sparse over exactly the batch's distinct chapters."""
    attn = make_attn(form, "memory.top_k_chapters=2", "memory.sparse_bank_grad=true")
    x = torch.randn(B, S, D, dtype=torch.float64)
    memory = torch.randn(C * T, BANK_D, dtype=torch.float64, requires_grad=True)
    chapters = attn.router(x.mean(1)).chapters
    (g,) = torch.autograd.grad(attn(x, memory).square().sum(), memory)
    assert g.is_sparse
    read = set(g.coalesce().indices()[0].div(T, rounding_mode="floor").tolist())
    assert read == set(chapters.flatten().tolist())


def test_auto_picks_the_cheaper_formulation():
    """Flop counts: absorbed wins for one query per sequence over a wide union, projected for long sequences."""
    attn = make_attn("auto", "memory.top_k_chapters=2")
    distinct = torch.tensor([[0, 1], [2, 3], [4, 5]])
    # B=3, H=4, hd=8, d=24, kv=2, 6 distinct chapters of 4 rows, 8 rows read per sequence:
    assert attn._sequence_absorbed(1, distinct)  # absorbed 3·4·8·24 + 3·4·8·24 < projected 24·24·2·8 + 3·4·8·8
    assert not attn._sequence_absorbed(64, distinct)


@pytest.mark.parametrize("form", ["projected", "absorbed"])
def test_fused_attention_kernel(form):
    """The gate column keeps SDPA on its fused CPU kernel (no [B, H, S, rows] softmax)."""
    from torch.profiler import profile

    attn = make_attn(form, "memory.top_k_chapters=2").float()
    x = torch.randn(B, S, D, requires_grad=True)
    memory = torch.randn(C * T, BANK_D, requires_grad=True)
    with profile() as prof:
        attn(x, memory).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


@pytest.mark.parametrize("chapters", [[[0, 1], [2, 3], [4, 5]], [[0, 1], [1, 0], [0, 2]]], ids=["distinct", "repeated"])
@pytest.mark.parametrize("sparse", [False, True])
def test_projected_kv_equals_projecting_each_sequence(chapters, sparse):
    """K/V and the bank's gradient, whether chapters repeat across sequences (one projection of the
    union) or not (rows indexed per sequence)."""
    from megamem.memory.sequence_routing import projected_kv

    torch.manual_seed(0)
    chapters = torch.tensor(chapters)
    k_proj, v_proj = (torch.nn.Linear(BANK_D, 16, bias=False).double() for _ in range(2))
    memory = torch.randn(C * T, BANK_D, dtype=torch.float64, requires_grad=True)
    k, v = projected_kv(memory, chapters, T, k_proj, v_proj, 2, 8, sparse)
    rows = memory.view(C, T, -1)[chapters].flatten(1, 2)  # [B, m·T, d], per sequence
    k_ref, v_ref = (p(rows).view(3, -1, 2, 8).transpose(1, 2) for p in (k_proj, v_proj))
    assert (k - k_ref).abs().max() <= 1e-14 and (v - v_ref).abs().max() <= 1e-14
    w = torch.randn_like(k)
    (g,) = torch.autograd.grad((k * w).sum() + (v * w).square().sum(), memory)
    (g_ref,) = torch.autograd.grad((k_ref * w).sum() + (v_ref * w).square().sum(), memory)
    assert g.is_sparse == sparse
    assert ((g.to_dense() if sparse else g) - g_ref).abs().max() <= 1e-12
