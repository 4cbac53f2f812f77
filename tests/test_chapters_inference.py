"""Chapters at inference: routing strategies with the KV cache, and the memory bound of token routing."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megamem.memory.routed_attention import merge_partials, pair_attention
from megamem.model import build_model

from conftest import decode_in_chunks, tiny_config


def chapter_model(*overrides):
    torch.manual_seed(0)
    model = build_model(tiny_config("memory.use_chapters=true", "memory.num_chapters=6", "memory.num_memory_tokens=24",
                                    "memory.top_k_chapters=2", "memory.num_shared_chapters=1",
                                    "memory.wo_init_zero=false", *overrides))
    for i in model.memory_layers:
        torch.nn.init.normal_(model.blocks[i].memory.attn.router.weight, std=1.0)
    return model.eval()


def test_token_routing_with_kv_cache_equals_full_forward():
    model = chapter_model("memory.routing_strategy_train=token", "memory.routing_strategy_inference=token")
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
    cached = decode_in_chunks(model, ids, [5] + [1] * 7, model.new_cache(2, 12))
    assert (cached - full).abs().max() <= 1e-5
    out = model.generate(ids[:, :5], max_new_tokens=6)
    for t in range(5, 11):  # greedy generate equals an argmax loop over full token-routed forwards
        with torch.no_grad():
            assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1))


def test_sequence_routing_routes_on_the_prompt():
    model = chapter_model("memory.routing_strategy_inference=sequence")
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        first = model(ids, cache=cache).logits
        second = model(ids[:, :1], cache=cache).logits
        assert (first - model(ids).logits).abs().max() <= 1e-5  # prompt forward = full sequence routing
    for layer in model.memory_layers:
        state = cache.layer(layer).state["routing"]
        assert state["routes"] == [0]  # routed once, on the prompt; K/V reused
        assert state["kv"][0].shape[2] == 3 * 4  # shared + 2 routed chapters of 4 rows
    assert torch.isfinite(second).all()


def test_rolling_reroutes_at_the_interval_on_the_recent_window():
    model = chapter_model("memory.routing_strategy_inference=rolling", "memory.rolling_interval=3",
                          "memory.rolling_window=4")
    ids = torch.randint(0, 61, (2, 16))
    hidden = {}
    for i in model.memory_layers:  # record the normed hidden states the router sees
        model.blocks[i].memory.norm.register_forward_hook(lambda m, a, out, i=i: hidden.setdefault(i, []).append(out))
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        model(ids[:, :5], cache=cache)
        for t in range(5, 16):
            model(ids[:, t:t + 1], cache=cache)
    for i in model.memory_layers:
        state = cache.layer(i).state["routing"]
        assert state["routes"] == [0, 8, 11, 14]  # prompt, then every 3 generated tokens
        seen = torch.cat(hidden[i], 1)  # [2, 16, D]
        expected = model.blocks[i].memory.attn.router(seen[:, 14 - 3:15].mean(1)).chapters  # last 4 tokens
        assert torch.equal(state["routing"].chapters, expected)
        rows = model.banks[model.bank_of_layer[i]]().view(6, 4, -1)[expected].flatten(1, 2)
        k = model.blocks[i].memory.attn.k_proj(rows)
        assert torch.allclose(state["kv"][0].transpose(1, 2).flatten(2), k, atol=1e-6)  # K/V follow the routing


def test_rolling_without_reroute_equals_sequence_routing():
    ids = torch.randint(0, 61, (2, 6))
    outs = []
    for strategy in ("sequence", "rolling"):
        model = chapter_model(f"memory.routing_strategy_inference={strategy}", "memory.rolling_interval=50",
                              "memory.rolling_window=6")
        outs.append(model.generate(ids, max_new_tokens=5))
    assert torch.equal(outs[0], outs[1])


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by torch ops while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.sizes:
                storage = t.untyped_storage()
                self.sizes[storage.data_ptr()] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage.data_ptr())
        return out

    def _free(self, key):
        self.live -= self.sizes.pop(key, 0)


def test_token_routing_peak_memory_is_bounded():
    """B·S = 4096 tokens, k = 8 chapters of 1024 rows: keys gathered per token would take
    4096·8·1024·32·4 B = 4.3 GB and the pair logits alone 0.5 GB; chunked pairs stay under 128 MB."""
    torch.manual_seed(0)
    N, k, T, C, H, d = 4096, 8, 1024, 16, 2, 32
    q = torch.randn(N, H, d, requires_grad=True)
    bank = torch.randn(C, T, 1, d, requires_grad=True)
    chap = torch.rand(N, C).argsort(1)[:, :k].flatten()
    tok = torch.arange(N).repeat_interleave(k)
    bias = torch.zeros(N * k, requires_grad=True)
    with LiveBytes() as mem:
        out, lse = pair_attention(q, bank, bank, tok, chap, bias, 0.1)
        merge_partials(out.view(N, k, H, d), lse.view(N, k, H)).square().sum().backward()
    assert bank.grad.abs().sum() > 0 and bias.grad.abs().sum() > 0
    assert mem.peak < 128 * 2 ** 20, f"token routing peaked at {mem.peak / 2 ** 20:.0f} MB"


@pytest.mark.parametrize("strategy", ["sequence", "token"])
def test_bf16_chapters_forward(strategy):
    model = chapter_model(f"memory.routing_strategy_train={strategy}").to(torch.bfloat16)
    ids = torch.randint(0, 61, (2, 7))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.loss)
