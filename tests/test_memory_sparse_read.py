"""Sharp memory reads (memory.memory_top_k, memory.memory_qk_norm) against brute-force float64 references."""
import math

import pytest
import torch

from conftest import assert_future_never_changes_the_past, decode_in_chunks, tiny_config
from megamem.memory.cross_attention import MemoryCrossAttention
from megamem.memory.diagnostics import entropy
from megamem.memory.sparse_read import top_k_read
from megamem.model import build_model


def masked_softmax_read(q, k, v, top_k, scale):
    """Reference: dense logits in float64, everything below each row's top_k-th logit masked, softmax, weighted sum."""
    H = q.shape[1]
    keys = k[0].double().repeat_interleave(H // k.shape[1], 0)
    values = v[0].double().repeat_interleave(H // v.shape[1], 0)
    logits = q[0].double() @ keys.transpose(1, 2) * scale
    kth = logits.sort(-1, descending=True).values[..., top_k - 1:top_k]
    weights = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    return (weights @ values).unsqueeze(0)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_top_k_read_equals_masked_softmax_and_only_read_rows_get_gradient(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(1, 4, 10, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, 50, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, 50, 8, dtype=torch.float64, requires_grad=True)
    y = top_k_read(q, k, v, 5, 0.35)
    torch.testing.assert_close(y, masked_softmax_read(q, k, v, 5, 0.35), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), (q, k, v))
    ref = torch.autograd.grad(masked_softmax_read(q, k, v, 5, 0.35).square().sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    H, group = 4, 4 // kv_heads
    logits = (q[0].detach() @ k[0].detach().repeat_interleave(group, 0).transpose(1, 2))
    read = torch.zeros(kv_heads, 50, dtype=torch.bool)
    for h in range(H):
        read[h // group, logits[h].topk(5, -1).indices.flatten()] = True
    assert (grads[1][0].abs().sum(-1) > 0).eq(read).all() and (grads[2][0].abs().sum(-1) > 0).eq(read).all()
    assert not read.all()  # some rows were not read: the test can tell


def test_top_k_of_every_row_is_dense_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 20, 8), torch.randn(1, 4, 20, 8)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(top_k_read(q, k, v, 20, 1 / math.sqrt(8)), dense, rtol=1e-5, atol=1e-6)


def test_qk_norm_is_unit_rms_vectors_times_a_learned_temperature():
    torch.manual_seed(2)
    attn = MemoryCrossAttention(32, 32, 4, 4, qk_norm=True)
    with torch.no_grad():
        attn.qk_norm.log_temperature.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    x, bank = torch.randn(2, 5, 32), torch.randn(30, 32)
    y = attn(x, bank)
    q = attn.q_proj(x).double().view(2, 5, 4, 8)
    kk = attn.k_proj(bank).double().view(30, 4, 8)
    vv = attn.v_proj(bank).double().view(30, 4, 8)
    qn = q / q.square().mean(-1, keepdim=True).add(1e-6).sqrt()
    kn = kk / kk.square().mean(-1, keepdim=True).add(1e-6).sqrt()
    temp = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64).exp()
    logits = torch.einsum("bshd,nhd->bshn", qn, kn) * temp[:, None] / 8  # temperature · q̂·k̂ / head_dim
    ref = torch.einsum("bshn,nhd->bshd", logits.softmax(-1), vv).reshape(2, 5, 32)
    torch.testing.assert_close(y.double(), attn.o_proj(ref.float()).double(), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert attn.qk_norm.log_temperature.grad.abs().min() > 0


SHARP = ("memory.memory_top_k=3", "memory.memory_qk_norm=true", "memory.wo_init_zero=false",
         "memory.num_memory_tokens=24")


def test_sharp_memory_model_is_causal_and_decodes_like_its_full_forward():
    torch.manual_seed(3)
    cfg = tiny_config(*SHARP)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 12))
    with torch.no_grad():
        assert_future_never_changes_the_past(model, ids, 7, cfg.model.vocab_size)
        full = model(ids).logits
    cached = decode_in_chunks(model, ids, [5, 1, 1, 5], model.new_cache(2, 12))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_top_k_diagnostic_is_the_entropy_of_the_read_rows():
    from megamem.memory.diagnostics import dense_entropy

    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 40, 8)
    got = dense_entropy(q, k, 0.5, 6)
    logits = (q[0].double() @ k[0].double().transpose(1, 2)) * 0.5
    p = logits.topk(6, -1).values.softmax(-1)
    ref = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(got["entropy"].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["entropy_norm"].double(), ref / math.log(6), rtol=1e-5, atol=1e-6)
    assert entropy(torch.zeros(3, 6)).allclose(torch.full((3,), math.log(6)))


def test_sharp_reads_zero3_two_ranks_match_one_rank(tmp_path):
    """The learned temperature is read inside its module's forward: ZeRO-3 gathers it (a partitioned read would fail)."""
    from dist_utils import run_ranks
    from test_train import ZERO, _fit

    steps = ("training.max_steps=4", "memory.memory_top_k=4", "memory.memory_qk_norm=true",
             "memory.memory_qk_temperature=20")
    one = run_ranks(_fit, str(tmp_path / "one"), ZERO[0], 4, steps, world_size=1, tmp_path=tmp_path / "r1")[0]
    two = run_ranks(_fit, str(tmp_path / "two"), ZERO[3], 2, steps, world_size=2, tmp_path=tmp_path / "r2")[0]
    assert one["train_losses"][0] > one["train_losses"][-1]
    assert torch.allclose(torch.tensor(two["train_losses"]), torch.tensor(one["train_losses"]), atol=1e-4, rtol=0)
    assert any("log_temperature" in n for n in two["group_names"]["memory_no_decay"])
