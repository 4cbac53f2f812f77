"""tools/benchmark.py at tiny sizes (so the tool never rots), FLOP counting against a closed form, and the
model changes made for speed (bf16 kernels widened on CPUs without bf16 GEMMs, label shift, last logits)."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, tiny_config
from megamem.model import build_model

sys.path.insert(0, os.path.join(ROOT, "tools"))


@pytest.fixture(scope="module")
def quick():
    import benchmark

    return benchmark.run(benchmark.ALL, "quick")


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_sub_benchmark_reports_finite_ratios(quick):
    import benchmark

    r = quick["results"]
    assert set(r) == set(benchmark.ALL)
    assert [v["dtype"] for v in r["vanilla"]["rows"]] == ["fp32", "bf16"]
    for v in r["vanilla"]["rows"]:
        assert _positive(v["ratio"]) and v["met"] == (v["ratio"] >= v["target"])
        assert v["ratio"] == pytest.approx(v["megamem_tokens_per_s"] / v["transformers_tokens_per_s"])
    assert [(v["dtype"], v["memory_tokens"]) for v in r["memory"]["rows"]] == [
        (d, n) for d in ("fp32", "bf16") for n in (64, 256)]
    for v in r["memory"]["rows"]:
        assert _positive(v["ratio"]) and v["step_gflop"] > v["vanilla_step_gflop"]
    modes = [(v["mode"], v["memory_tokens"]) for v in r["chapters"]["rows"]]
    assert modes == [(m, n) for m in ("sequence-sparse", "token-sparse") for n in (256, 1024)]
    assert all(_positive(v["vs_smallest_bank"]) and _positive(v["vs_dense_smallest_bank"]) for v in r["chapters"]["rows"])
    assert [v["vs_smallest_bank"] for v in r["chapters"]["rows"]][::2] == [1.0, 1.0]
    assert all(_positive(v["mfu"]) and _positive(v["peak_gflops"]) for v in r["mfu"]["rows"])
    for v in r["generation"]["rows"]:  # same weights give the same greedy tokens, memory model included
        assert v["same_tokens"] is True and _positive(v["ratio"])
    wrapper = r["generation"]["hf_wrapper"]  # an exported folder's generate() gives megamem's tokens
    assert [v["model"] for v in wrapper] == ["dense bank", "chapters, sequence routing"]
    assert all(v["same_tokens"] is True and _positive(v["hf_over_megamem_time"]) for v in wrapper)
    z, e = r["distributed"]["zero3"], r["distributed"]["expert_parallel"]
    for x in (z["speedup_2_ranks_zero3"], z["zero3_over_zero0"], z["bank_gather_fraction_of_zero3_step"], e["ep2_over_ep1"]):
        assert _positive(x)
    peer, mla = r["peer_mla"]["peer"], r["peer_mla"]["mla"]
    assert [v["model"] for v in peer["rows"]] == ["dense_mlp", "peer", "peer_sparse"]
    assert peer["rows"][0]["vs_dense_mlp"] == 1.0 and all(_positive(v["vs_dense_mlp"]) for v in peer["rows"])
    assert peer["rows"][1]["final_loss"] == pytest.approx(peer["rows"][2]["final_loss"], abs=0.05)  # lazy Adam ≈ Adam
    assert peer["active_neurons"] == 2 * 4 and peer["experts"] == 64
    for v in mla["rows"]:  # MLA caches (d_c + d_r) values per layer, GQA 2 · kv_heads · head_dim, fp32
        assert v["mla_cache_bytes_per_token"] == 2 * (16 + 4) * 4 and v["gqa_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 4
        assert _positive(v["mla_over_gqa_tokens_per_s"])
    wa = r["window_attractor"]["rows"]
    assert [(v["context"], v["model"]) for v in wa] == [(c, m) for c in (4, 12, 48)
                                                         for m in ("plain", "window", "window_attractor")]
    assert all(_positive(v["tokens_per_s_vs_plain"]) and v["cache_bytes"] > 0 for v in wa)
    rr = r["routed_rows"]["rows"]  # sequence-routed banks vs a dense bank of the k·T rows they attend
    assert [(v["dtype"], v["memory_tokens"], v["memory_dim"]) for v in rr] == [
        (d, n, w) for d in ("fp32", "bf16") for n, w in ((64, 32), (256, 32), (1024, 16))]
    for v in rr:
        assert v["attended_rows"] == 16 and 1 <= v["distinct_chapters_per_layer"] <= v["picks_per_layer"] == 4
        assert v["vs_dense_attended"] == pytest.approx(v["step_s"] / v["dense_step_s"]) and _positive(v["step_s"])
    be = r["bf16_engine"]["rows"]  # DeepSpeed's bf16 engine (fp32 master weights) vs the cast model and transformers
    assert [v["system"] for v in be] == ["cast", "transformers", "engine_zero0", "engine_zero1"]
    assert be[0]["vs_cast"] == 1.0 and be[1]["vs_transformers"] == 1.0
    for v in be:
        assert _positive(v["tokens_per_s"]) and v["vs_cast"] == pytest.approx(v["tokens_per_s"] / be[0]["tokens_per_s"])
    table = benchmark.table(quick)
    assert table.count("\n| ") == 2 + 4 + 4 + 2 + 2 + 2 + 4 + 2 + 4 + 3 * 2 * 2 + 6 + 2  # one row per measured ratio


def test_window_attractor_cache_bytes_follow_the_formula(tmp_path):
    """The decode-memory arm at tiny sizes: KV bytes = layers × 2 × kv_heads × head_dim × tokens × 4 (fp32), with
    tokens = min(cache tokens, W) under a window (flat beyond W), plus d_state × hidden × 4 per attractor layer."""
    from perf import window_attractor

    size = dict(dim=32, inter=48, layers=2, heads=4, kv_heads=2, window=16, chunk=8, new_tokens=2,
                contexts=[4, 12, 30, 64], attractor=dict(layers=1, d_state=8))
    res = window_attractor.run(size, iters=1, warmup=0)
    rows = {(v["context"], v["model"]): v for v in res["rows"]}
    assert len(rows) == 12
    for (context, model), v in rows.items():
        tokens = context + 2 * 2  # new_tokens × (the measured round + 1 timed round)
        held = tokens if model == "plain" else min(tokens, 16)
        assert v["cache_tokens"] == tokens
        assert v["kv_cache_bytes"] == 2 * 2 * 2 * 8 * held * 4
        assert v["state_bytes"] == (1 * 8 * 32 * 4 if model == "window_attractor" else 0)
        plain = rows[(context, "plain")]
        assert v["cache_bytes_vs_plain"] == v["cache_bytes"] / plain["cache_bytes"]
        assert _positive(v["tokens_per_s"])
    assert len({rows[(c, "window")]["kv_cache_bytes"] for c in (12, 30, 64)}) == 1  # flat beyond W
    text = window_attractor.table(res)
    assert text.count("\n| ") == 12
    assert os.path.getsize(window_attractor.plot(res, str(tmp_path / "wa.png"))) > 0


def test_cli_writes_json_and_refuses_bad_arguments(tmp_path, capsys):
    import json

    import benchmark

    out = tmp_path / "b.json"
    assert benchmark.main(["--quick", "--only", "mfu", "--json", str(out), "--plot-dir", ""]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] == torch.__version__ and len(data["results"]["mfu"]["rows"]) == 2
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--iters", "0"])
    assert "--iters must be ≥ 1, got 0" in capsys.readouterr().err


def test_flops_per_token_closed_form():
    from megamem.train.metrics import flops_per_token

    d, H, KV, L, inter, V, N, S, B = 32, 4, 2, 4, 48, 61, 12, 16, 3
    hd = d // H
    vanilla = build_model(tiny_config("memory.vanilla_mode=true"))
    per_layer = 2 * d + d * (H + 2 * KV) * hd + d * d + 3 * d * inter  # norms, qkv, o, SwiGLU
    weights = 6 * (L * per_layer + d + V * d)  # + final norm + LM head
    attention = 6 * L * S * d  # QKᵀ and PV, 2·d each, over S/2 keys on average, ×3 for training
    assert flops_per_token(vanilla, S, B) == weights + attention
    memory = build_model(tiny_config("memory.memory_layer_placement=last_k", "memory.memory_layer_k=2"))
    kv = 2 * d * H * hd  # memory heads = model heads, kv heads = heads: k and v are d×d
    branch = d + d * d + d * d  # norm, q, o: per token
    expected = weights + attention + 2 * (6 * branch + 6 * kv * N / (B * S) + 12 * N * d)
    assert flops_per_token(memory, S, B) == pytest.approx(expected, rel=1e-12)


def test_widened_bf16_kernels_match_torch_bf16():
    from megamem import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 64, generator=g).bfloat16().requires_grad_()
    w = torch.randn(48, 64, generator=g).bfloat16().requires_grad_()
    ours = ops.linear(x, w)
    ref = F.linear(x.detach(), w.detach())  # torch's own bf16 kernel
    assert ours.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), ref.float(), rtol=2 ** -7, atol=1e-2)
    ours.sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert torch.allclose(w.grad.float(), x.detach().float().flatten(0, 1).sum(0).expand(48, 64), rtol=2 ** -7, atol=1e-2)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).bfloat16() for _ in range(3))
    y = ops.sdpa(q, k, v, is_causal=True)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), F.scaled_dot_product_attention(q, k, v, is_causal=True).float(), atol=2e-2)
    if not ops.cpu_has_native_bf16():  # this path is the fp32 GEMM, rounded once
        assert torch.equal(ours, F.linear(x.detach().float(), w.detach().float()).bfloat16())
    else:  # native bf16 GEMMs: torch's own kernel, untouched
        assert torch.equal(ours, ref)


def test_loss_and_last_logits_unchanged():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    ids = torch.randint(0, 61, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-6, rtol=0)
    last = model(ids, last_logits_only=True).logits
    assert last.shape == (2, 1, 61) and torch.allclose(last, out.logits[:, -1:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="last_logits_only"):
        model(ids, labels=ids, last_logits_only=True)


def test_flops_per_token_counts_the_chapters_a_token_reads():
    """Chapters: memory attention over (top_k + shared) chapters, not the whole bank (MFU of chapter models)."""
    from megamem.train.metrics import flops_per_token

    d, L, S, B, rows = 32, 4, 16, 3, (2 + 1) * 4  # 24-row bank, 6 chapters of 4, top-2 + 1 shared → 12 rows read
    model = build_model(tiny_config("memory.use_chapters=true", "memory.num_memory_tokens=24", "memory.num_chapters=6",
                                    "memory.top_k_chapters=2", "memory.num_shared_chapters=1",
                                    "memory.memory_layer_placement=last_k", "memory.memory_layer_k=2"))
    embed_and_banks = {"tok_embeddings.weight", "banks.0.memory"}
    weights = 6 * sum(p.numel() for n, p in model.named_parameters() if n not in embed_and_banks)
    expected = weights + 6 * L * S * d + 2 * 12 * rows * d  # 2 memory layers, QKᵀ and PV ×3 over 12 rows
    assert flops_per_token(model, S, B) == pytest.approx(expected, rel=1e-12)


def test_flops_per_token_counts_frozen_weights_without_their_gradient(tmp_path):
    """An adapter's frozen base: forward + input gradient (4 per weight), no weight gradient."""
    from adapter_utils import adapter_config, saved_base

    from megamem.adapter import build_adapter_model
    from megamem.train.metrics import flops_per_token

    path, _ = saved_base(tmp_path, "llama")
    model = build_adapter_model(adapter_config(path, "memory.memory_layer_placement=last_k", "memory.memory_layer_k=1"))
    d, L, S, N = 32, 3, 16, 8
    frozen = sum(p.numel() for n, p in model.base.named_parameters() if "embed_tokens" not in n)
    trainable = sum(p.numel() for n, p in model.named_parameters() if n.startswith("branches."))
    assert all(not p.requires_grad for p in model.base.parameters())
    expected = 4 * frozen + 6 * trainable + 6 * L * S * d + 12 * N * d
    assert flops_per_token(model, S) == pytest.approx(expected, rel=1e-12)
