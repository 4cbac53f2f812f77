import itertools

import pytest
import torch

from megamem.model import build_model
from megamem.parallel.checkpointing import activation_checkpointing, set_activation_checkpointing

from conftest import tiny_config

BANKS = {
    "full": [],
    "factorized": ["memory.use_low_rank_memory=true", "memory.memory_rank=8", "memory.low_rank_mode=factorized"],
    "reduced_dim": ["memory.use_low_rank_memory=true", "memory.memory_rank=8", "memory.low_rank_mode=reduced_dim"],
    "int8": ["memory.quantize_memory=true", "memory.memory_quant_bits=8"],
    "int4": ["memory.quantize_memory=true", "memory.memory_quant_bits=4"],
    "lowrank_proj": ["memory.use_low_rank_projections=true", "memory.projection_rank=8", "memory.memory_dim=24"],
}
PLACEMENTS = {
    "all": ([], [0, 1, 2, 3]),
    "first_k": (["memory.memory_layer_placement=first_k", "memory.memory_layer_k=2"], [0, 1]),
    "last_k": (["memory.memory_layer_placement=last_k", "memory.memory_layer_k=3"], [1, 2, 3]),
    "every_n": (["memory.memory_layer_placement=every_n", "memory.memory_layer_n=2"], [1, 3]),
    "custom": (["memory.memory_layer_placement=custom", "memory.memory_layer_indices=[3, 0, 2]"], [0, 2, 3]),
    "none": (["memory.memory_layer_placement=none"], []),
}
SHARING = {
    "shared": ([], lambda n: 1 if n else 0),
    "per_layer": (["memory.memory_sharing=per_layer"], lambda n: n),
    "every_k": (["memory.memory_sharing=every_k_layers", "memory.memory_sharing_k=2"], lambda n: (n + 1) // 2),
}


def make(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_config(*overrides))


# "none" builds the same memory-less model whatever the bank, sharing and layout: it is tested once
VARIANTS = [v for v in itertools.product(BANKS, PLACEMENTS, SHARING, ["A", "B"]) if v[1] != "none"] + \
    [("full", "none", "shared", "A")]


@pytest.mark.parametrize("bank,placement,sharing,layout", VARIANTS)
def test_every_variant_reads_its_memory_and_trains(bank, placement, sharing, layout):
    """Each variant builds the layers and banks it names, its memory changes the logits (against the
    vanilla model holding the same other weights), every trainable parameter gets a gradient, and
    three AdamW steps on one batch lower that batch's loss."""
    place_over, layers = PLACEMENTS[placement]
    share_over, banks_for = SHARING[sharing]
    model = make(*BANKS[bank], *place_over, *share_over, f"memory.memory_block_variant={layout}",
                 "memory.wo_init_zero=false")
    assert model.memory_layers == layers
    assert len(model.banks) == banks_for(len(layers))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    vanilla = make("memory.vanilla_mode=true")
    vanilla.load_state_dict({k: v for k, v in model.state_dict().items() if k in vanilla.state_dict()})
    with torch.no_grad():
        moved = (model(ids).logits - vanilla(ids).logits).abs().max()
    # memory is read exactly where it is placed (without memory the two models compute the same thing bit for bit;
    # low-rank W_o at its init scale moves the logits by only ~1e-5, so any difference counts)
    assert (moved > 0) == bool(layers), moved
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = out.loss.item()
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert loss.item() < first - 1e-3, (first, loss.item())


@pytest.mark.parametrize("layout", ["A", "B"])
@pytest.mark.parametrize("bank", ["full", "factorized", "int4"])
def test_zero_wo_equals_vanilla(layout, bank):
    """W_o = 0: the memory model computes exactly what its vanilla twin computes."""
    memory_model = make(*BANKS[bank], f"memory.memory_block_variant={layout}", "memory.memory_sharing=per_layer")
    vanilla = make("memory.vanilla_mode=true", seed=1)
    missing, unexpected = memory_model.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("banks.") or ".memory." in k for k in missing)
    ids = torch.randint(0, 61, (3, 11))
    out = memory_model(ids, labels=ids)
    assert torch.equal(out.logits, vanilla(ids).logits)
    out.loss.backward()
    for block in memory_model.blocks:
        w_o = block.memory.attn.o_proj
        grad = (w_o.up if hasattr(w_o, "up") else w_o).weight.grad
        assert grad.abs().sum() > 0, "W_o must learn from the first step"


def test_vanilla_builds_no_memory():
    model = make("memory.vanilla_mode=true")
    assert len(model.banks) == 0 and all(b.memory is None for b in model.blocks)
    assert model.parameter_counts()["memory"] == 0
    assert not [n for n, _ in model.named_parameters() if "memory" in n or "bank" in n]


@pytest.mark.parametrize("extra", [[], ["model.use_rope=false"], ["memory.memory_block_variant=B"]])
def test_causal(extra):
    model = make("memory.wo_init_zero=false", *extra).eval()
    ids = torch.randint(0, 61, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 5) % 61
    a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("extra", [[], ["model.use_rope=false"], ["model.num_kv_heads=4"],
                                   ["memory.memory_sharing=per_layer", "memory.memory_block_variant=B"]])
def test_kv_cache_matches_full_forward(extra):
    model = make("memory.wo_init_zero=false", *extra).eval()
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 20)
        chunks = [model(ids[:, :5], cache=cache).logits, model(ids[:, 5:8], cache=cache).logits]  # prefill + chunk
        chunks += [model(ids[:, t:t + 1], cache=cache).logits for t in range(8, 13)]  # one token at a time
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_generate_greedy_matches_full_forward_argmax():
    model = make("memory.wo_init_zero=false", "model.eos_token_id=null").eval()
    prompt = torch.randint(0, 61, (2, 5))
    out = model.generate(prompt, max_new_tokens=8)
    ref = prompt
    with torch.no_grad():
        for _ in range(8):
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_generate_computes_memory_kv_once():
    model = make("memory.wo_init_zero=false", "memory.memory_sharing=per_layer").eval()
    calls = []
    for block in model.blocks:
        block.memory.attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    model.generate(torch.randint(0, 61, (3, 4)), max_new_tokens=6)
    assert len(calls) == len(model.memory_layers)


def test_generate_stops_at_eos_and_pads():
    model = make("memory.wo_init_zero=false").eval()
    prompt = torch.randint(0, 61, (2, 3), generator=torch.Generator().manual_seed(0))
    free = model.generate(prompt, max_new_tokens=6)
    eos = int(free[0, 4])  # the second token sequence 0 generates
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert out[0, 4] == eos
    # rows decode independently: generation stops once every row has emitted eos (or at max_new_tokens)
    first_eos = [next((i for i in range(3, free.shape[1]) if free[b, i] == eos), free.shape[1] - 1) for b in range(2)]
    assert out.shape[1] == max(first_eos) + 1
    assert torch.equal(out[1, :max(first_eos) + 1], free[1, :max(first_eos) + 1])
    pad = model.model_config.pad_token_id
    assert (out[0, 5:] == pad).all()


def test_sampling_is_seeded_and_respects_top_k():
    model = make("memory.wo_init_zero=false").eval()
    prompt = torch.randint(0, 61, (2, 3))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate(prompt, 10, temperature=1.0, top_k=1, generator=g1)
    assert torch.equal(a, model.generate(prompt, 10))  # top_k=1 sampling is greedy
    b = model.generate(prompt, 10, temperature=1.5, top_p=0.9, generator=g2)
    c = model.generate(prompt, 10, temperature=1.5, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(b, c)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = make()
    with pytest.raises(ValueError, match="exceeds model.max_seq_len = 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 61, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = make("memory.wo_init_zero=false", f"memory.memory_gradient_checkpointing={str(ckpt).lower()}")
        set_activation_checkpointing(model, ckpt)
        assert activation_checkpointing(model) == ckpt
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_dropout_only_in_training():
    model = make("model.dropout=0.5", "memory.memory_dropout=0.5", "model.attention_dropout=0.5",
                 "memory.wo_init_zero=false")
    ids = torch.randint(0, 61, (1, 8))
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_tied_embeddings_share_storage():
    model = make("model.tie_embeddings=true")
    assert model.lm_head.weight is model.tok_embeddings.weight
    untied = make("model.tie_embeddings=false")
    assert untied.parameter_counts()["total"] - model.parameter_counts()["total"] == 61 * 32


def _reference_flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
    """flash-attn's contract, written out: [B, S, H, hd] layout, GQA by head groups, causal mask aligned
    bottom-right (query i of S sees keys up to T - S + i), computed in float64."""
    B, S, H, hd = q.shape
    T, KV = k.shape[1], k.shape[2]
    k, v = (t.double().repeat_interleave(H // KV, dim=2) for t in (k, v))
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k) / hd ** 0.5
    if causal:
        allowed = torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).to(q.dtype)


def test_flash_attention_branch_matches_sdpa_with_and_without_cache(monkeypatch):
    """The flash-attn branch (CUDA-only) wired to a float64 stand-in with flash-attn's contract: same logits
    as the SDPA path, for a full forward and for cached decoding (where the bottom-right mask matters).
    On CPU, and for fp32, the real selector never picks flash-attn."""
    import sys
    import types

    from megamem.model.attention import mha as attention

    assert not attention.flash_attention_usable(torch.zeros(2, dtype=torch.bfloat16))
    fake = types.ModuleType("flash_attn")
    calls = []
    fake.flash_attn_func = lambda *a, **kw: (calls.append(1), _reference_flash_attn_func(*a, **kw))[1]
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(attention, "flash_attention_usable", lambda x: True)
    ids = torch.randint(0, 61, (2, 9))
    flash = make("model.use_flash_attention=true", "memory.wo_init_zero=false").eval()
    sdpa_model = make("model.use_flash_attention=false", "memory.wo_init_zero=false").eval()
    with torch.no_grad():
        want = sdpa_model(ids).logits
        assert (flash(ids).logits - want).abs().max() <= 1e-5
        cache = flash.new_cache(2, 9)
        steps = [flash(ids[:, :4], cache=cache).logits, flash(ids[:, 4:7], cache=cache).logits,
                 flash(ids[:, 7:8], cache=cache).logits, flash(ids[:, 8:], cache=cache).logits]
        assert (torch.cat(steps, 1) - want).abs().max() <= 1e-5
    assert len(calls) == 5 * 4  # every layer of every forward took the flash branch


def test_bf16_forward():
    model = make("memory.wo_init_zero=false", *BANKS["int8"]).to(torch.bfloat16)
    ids = torch.randint(0, 61, (2, 7))
    ref = make("memory.wo_init_zero=false", *BANKS["int8"])
    out = model(ids).logits
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 2e-3 per value); over 4 blocks the logits
    # (|x| ≲ 0.3 here) measured within 3.4e-3 of fp32, a few roundings of the largest activations.
    # Asserted with ~3.5× margin: 1.2e-2, a tenth of the logits' spread (std ≈ 0.12), so a real error shows.
    full = ref(ids).logits
    assert (out.float() - full).abs().max() < 1.2e-2 and full.std() > 0.05
