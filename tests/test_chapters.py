"""Chapters: parity with dense memory attention and with a naive per-token gather; router losses."""
import math

import pytest
import torch

from megamem.memory.chapters import ChapterMemoryAttention
from megamem.memory.cross_attention import MemoryCrossAttention
from megamem.model import build_model
from megamem.parallel.checkpointing import set_activation_checkpointing

from conftest import tiny_config

C, T, D, BANK_D = 6, 4, 32, 24


def chapter_cfg(*overrides):
    return tiny_config("memory.use_chapters=true", f"memory.num_chapters={C}", f"memory.num_memory_tokens={C * T}",
                       *overrides).memory


def make_attn(*overrides, low_rank=False, seed=0):
    torch.manual_seed(seed)
    cfg = chapter_cfg(*overrides)
    attn = ChapterMemoryAttention(D, BANK_D, 4, 2, cfg, projection_rank=8 if low_rank else None)
    torch.nn.init.normal_(attn.router.weight, std=0.5)
    return attn


def grads(out, tensors):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * g).sum(), tensors, allow_unused=True)


def close(a, b, atol=1e-5):
    assert (a - b).abs().max().item() <= atol, (a - b).abs().max().item()


CASES = [("sequence", "auto"), ("sequence", "absorbed"), ("sequence", "projected"), ("token", "absorbed"),
         ("token", "projected")]


@pytest.mark.parametrize("zero_router", [True, False])
@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("strategy,form", CASES)
def test_all_chapters_equal_dense_memory_attention(strategy, form, low_rank, zero_router):
    """k = num_chapters: every strategy is dense memory attention over the whole bank (forward and grads).

    The router's log-gate adds a gradient path x → router → gate; it vanishes with a zero router
    (then dL/dx equals dense too). With a trained router every other gradient still equals dense.
    """
    attn = make_attn(f"memory.top_k_chapters={C}", f"memory.routing_strategy_train={strategy}",
                     f"memory.{strategy}_routing_formulation={form}", low_rank=low_rank)
    if zero_router:
        torch.nn.init.zeros_(attn.router.weight)
    dense = MemoryCrossAttention(D, BANK_D, 4, 2, projection_rank=8 if low_rank else None)
    dense.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(3, 5, D, requires_grad=True)
    memory = torch.randn(C * T, BANK_D, requires_grad=True)
    y, ref = attn(x, memory), dense(x, memory)
    close(y, ref)
    params = [x, memory] + list(dense.parameters())
    ours = grads(y, [x, memory] + list(attn.parameters())[:len(params) - 2])
    for i, (a, b) in enumerate(zip(ours, grads(ref, params))):
        if zero_router or i > 0:
            close(a, b)


def naive_routed(attn, x, memory, per_token):
    """Each token gathers its chapters' rows, projects them and runs one explicit softmax."""
    B, S, _ = x.shape
    H, hd, kv = attn.num_heads, attn.head_dim, attn.num_kv_heads
    h = x.reshape(B * S, -1)
    routing = attn.router(h if per_token else x.mean(1))
    rows = memory.view(C, T, -1)
    out = []
    for n in range(B * S):
        u = n if per_token else n // S
        m = rows[routing.chapters[u]].flatten(0, 1)
        k = attn.k_proj(m).view(-1, kv, hd).repeat_interleave(H // kv, 1)
        v = attn.v_proj(m).view(-1, kv, hd).repeat_interleave(H // kv, 1)
        q = attn.q_proj(h[n]).view(H, hd)
        s = torch.einsum("he,jhe->hj", q, k) / math.sqrt(hd) + routing.bias[u].repeat_interleave(T)
        o = torch.einsum("hj,jhe->he", s.softmax(-1), v).reshape(-1) * routing.gate[u]
        out.append(attn.o_proj(o))
    return torch.stack(out).view(B, S, -1)


@pytest.mark.parametrize("shared,k", [(0, 2), (1, 2), (2, 1)])
@pytest.mark.parametrize("strategy,form", CASES)
def test_routing_equals_naive_gather(strategy, form, shared, k):
    """k < num_chapters, shared chapters and routed_scaling_factor included: forward and all gradients."""
    attn = make_attn(f"memory.top_k_chapters={k}", f"memory.num_shared_chapters={shared}",
                     "memory.routed_scaling_factor=1.7", f"memory.routing_strategy_train={strategy}",
                     f"memory.{strategy}_routing_formulation={form}")
    x = torch.randn(2, 5, D, requires_grad=True)
    memory = torch.randn(C * T, BANK_D, requires_grad=True)
    y, ref = attn(x, memory), naive_routed(attn, x, memory, strategy == "token")
    close(y, ref)
    tensors = [x, memory] + list(attn.parameters())
    for a, b in zip(grads(y, tensors), grads(ref, tensors)):
        close(a, b)


@pytest.mark.parametrize("k,shared", [(1, 0), (2, 0), (1, 1)])
@pytest.mark.parametrize("strategy", ["sequence", "token"])
def test_router_receives_gradient(strategy, k, shared):
    torch.manual_seed(0)
    model = build_model(tiny_config("memory.use_chapters=true", "memory.num_chapters=4", "memory.num_memory_tokens=16",
                                    f"memory.top_k_chapters={k}", f"memory.num_shared_chapters={shared}",
                                    f"memory.routing_strategy_train={strategy}", "memory.wo_init_zero=false",
                                    "memory.use_load_balance_loss=false"))
    ids = torch.randint(0, 61, (2, 9))
    out = model(ids, labels=ids)
    assert out.aux_losses == {}
    out.loss.backward()
    for i in model.memory_layers:
        g = model.blocks[i].memory.attn.router.weight.grad
        assert g is not None and g.abs().sum() > 0, f"layer {i} router got no gradient"


def test_router_losses_hand_computed():
    """Two units, 4 routed chapters, k = 1; logits chosen so the numbers are easy by hand."""
    cfg = chapter_cfg("memory.num_chapters=4", "memory.num_memory_tokens=16", "memory.top_k_chapters=1",
                      "memory.use_auxiliary_loss=true", "memory.use_z_loss=true",
                      "memory.load_balance_coefficient=0.5", "memory.auxiliary_loss_coefficient=0.25",
                      "memory.z_loss_coefficient=0.1")
    from megamem.memory.router import ChapterRouter, chapter_usage, router_losses

    router = ChapterRouter(4, 4, 0, 1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    h = torch.tensor([[0.0, math.log(2), 0.0, 0.0], [math.log(3), 0.0, 0.0, 0.0]])
    routing = router(h)  # probs [.2, .4, .2, .2] → picks 1; [.5, 1/6, 1/6, 1/6] → picks 0
    assert routing.chapters.flatten().tolist() == [1, 0]
    losses = router_losses(routing, cfg)
    mean_p = [(0.2 + 0.5) / 2, (0.4 + 1 / 6) / 2]
    assert losses["load_balance_loss"].item() == pytest.approx(0.5 * 4 * (0.5 * mean_p[0] + 0.5 * mean_p[1]), rel=1e-6)
    assert losses["auxiliary_loss"].item() == pytest.approx(0.25 * 0.08, rel=1e-5)  # importance [.7, .567, .367, .367]
    assert losses["z_loss"].item() == pytest.approx(0.1 * (math.log(5) ** 2 + math.log(6) ** 2) / 2, rel=1e-6)
    assert chapter_usage(routing, 4).tolist() == [1, 1, 0, 0]


def test_model_returns_weighted_losses_and_usage():
    torch.manual_seed(0)
    model = build_model(tiny_config("memory.use_chapters=true", "memory.num_chapters=4", "memory.num_memory_tokens=16",
                                    "memory.top_k_chapters=2", "memory.num_shared_chapters=1",
                                    "memory.routing_strategy_train=token", "memory.use_z_loss=true",
                                    "memory.use_auxiliary_loss=true"))
    ids = torch.randint(0, 61, (2, 9))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"load_balance_loss", "auxiliary_loss", "z_loss"}
    assert set(out.chapter_usage) == set(model.memory_layers)
    for usage in out.chapter_usage.values():
        assert usage[0] == 18 and usage.sum() == 18 * 3  # shared chapter read by all 18 tokens, + 2 routed each
    (out.loss + sum(out.aux_losses.values())).backward()


def test_shared_router_is_one_parameter():
    model = build_model(tiny_config("memory.use_chapters=true", "memory.num_chapters=4", "memory.num_memory_tokens=16",
                                    "memory.top_k_chapters=2", "memory.shared_router=true"))
    routers = {id(model.blocks[i].memory.attn.router.weight) for i in model.memory_layers}
    assert len(routers) == 1 and len(model.memory_layers) == 4


BANKS = {
    "full": [],
    "factorized": ["memory.use_low_rank_memory=true", "memory.memory_rank=8"],
    "reduced_dim": ["memory.use_low_rank_memory=true", "memory.memory_rank=8", "memory.low_rank_mode=reduced_dim"],
    "int8": ["memory.quantize_memory=true"],
}


@pytest.mark.parametrize("bank", BANKS)
@pytest.mark.parametrize("strategy", ["sequence", "token"])
def test_model_with_all_chapters_equals_dense_model(bank, strategy):
    """Every bank variant: a chapter model reading all chapters computes the dense model's logits and grads."""
    common = [*BANKS[bank], "memory.num_memory_tokens=16", "memory.wo_init_zero=false", "memory.memory_sharing=per_layer"]
    dense = build_model(tiny_config(*common))
    routed = build_model(tiny_config(*common, "memory.use_chapters=true", "memory.num_chapters=4",
                                     "memory.top_k_chapters=4", f"memory.routing_strategy_train={strategy}"))
    routed.load_state_dict(dense.state_dict(), strict=False)
    for i in routed.memory_layers:  # zero router: no x → router gradient path (see the module-level test)
        torch.nn.init.zeros_(routed.blocks[i].memory.attn.router.weight)
    ids = torch.randint(0, 61, (2, 7))
    a, b = routed(ids, labels=ids), dense(ids, labels=ids)
    close(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    named = dict(routed.named_parameters())
    for name, p in dense.named_parameters():
        close(named[name].grad, p.grad)


@pytest.mark.parametrize("strategy", ["sequence", "token"])
def test_gradient_checkpointing_with_chapters(strategy):
    """Block and memory-only recomputation give the same loss, router losses and gradients."""
    results = []
    for mode in ("none", "blocks", "memory"):
        torch.manual_seed(0)
        model = build_model(tiny_config("memory.use_chapters=true", "memory.num_chapters=4",
                                        "memory.num_memory_tokens=16", "memory.top_k_chapters=2",
                                        "memory.wo_init_zero=false", f"memory.routing_strategy_train={strategy}",
                                        f"memory.memory_gradient_checkpointing={str(mode == 'memory').lower()}"))
        set_activation_checkpointing(model, mode == "blocks")
        ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
        out = model(ids, labels=ids)
        (out.loss + sum(out.aux_losses.values())).backward()
        results.append((out.loss.item(), {k: v.item() for k, v in out.aux_losses.items()},
                        [p.grad.clone() for p in model.parameters()]))
    for loss, aux, grads_ in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-6) and aux == pytest.approx(results[0][1], abs=1e-6)
        for a, b in zip(grads_, results[0][2]):
            close(a, b)
