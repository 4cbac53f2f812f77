"""Decoding state owned by megamem: adapters (HF generate on the base) and exported HF folders.

With a non-zero memory path (random W_o) and routers that discriminate, for every inference
strategy: banks are materialised once per generate(), memory K/V projected once per route, the
router called exactly as the strategy says, and the cached step logits equal full recomputation.
The memory layer is the model's last layer, so the hidden states the router reads do not depend
on earlier routing: the reference routing is computed independently from a full forward, then
pinned in full forwards without cache.
"""
import warnings

import pytest
import torch

from adapter_utils import saved_base, adapter_config
from conftest import tiny_config

from megamem.adapter import build_adapter_model
from megamem.adapter.decoding import DecodingStateError

P, NEW, INTERVAL, WINDOW = 5, 9, 3, 4
CHAPTERS = ("memory.use_chapters=true", "memory.num_memory_tokens=24", "memory.num_chapters=6",
            "memory.top_k_chapters=2", "memory.num_shared_chapters=1", f"memory.rolling_interval={INTERVAL}",
            f"memory.rolling_window={WINDOW}", "memory.token_routing_formulation=absorbed")
LAST_LAYER = ("memory.memory_layer_placement=last_k", "memory.memory_layer_k=1", "memory.wo_init_zero=false")
STRATEGIES = ("dense", "sequence", "rolling", "token")


def overrides(strategy):
    if strategy == "dense":
        return LAST_LAYER
    train = "token" if strategy == "token" else "sequence"
    return (*LAST_LAYER, *CHAPTERS, f"memory.routing_strategy_train={train}",
            f"memory.routing_strategy_inference={strategy}")


class Harness:
    """The model under test, its memory modules, and how to run generate() / a full forward on it."""

    def __init__(self, kind, strategy, tmp_path):
        torch.manual_seed(0)
        self.strategy = strategy
        if kind == "adapter":
            path, _ = saved_base(tmp_path, "qwen2")
            self.model = build_adapter_model(adapter_config(path, *overrides(strategy)), seed=0).eval()
            self.banks = list(self.model.banks)
            self.branch = self.model.branches[str(self.model.memory_layers[-1])]
            self.full = lambda ids: self.model(ids).logits
            self.generate = lambda ids: self.model.generate(ids, NEW, return_dict_in_generate=True,
                                                            output_logits=True)
        else:
            from megamem.hf.modeling import MegamemForCausalLM
            from megamem.model import build_model

            cfg = tiny_config(*overrides(strategy))
            inner = build_model(cfg).eval()
            self.model = MegamemForCausalLM.from_megamem(inner, cfg).eval()
            self.banks = list(inner.banks)
            self.branch = inner.blocks[inner.memory_layers[-1]].memory
            self.full = lambda ids: self.model(ids).logits
            self.generate = lambda ids: self.model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                                            eos_token_id=None, return_dict_in_generate=True,
                                                            output_logits=True)
        torch.nn.init.normal_(self.branch.attn.output_layer().weight, std=0.5)
        if strategy != "dense":
            torch.nn.init.normal_(self.branch.attn.router.weight, std=2.0)

    def count(self, module, into, key):
        return module.register_forward_hook(lambda m, a, out: into.setdefault(key, []).append(out))


def reference_routes(h, strategy):
    """(first position, router input) of each route, from the normed hidden states h [B, L, D]."""
    if strategy == "sequence":
        return [(0, h[:, :P].mean(1))]
    routes = [(0, h[:, P - WINDOW:P].mean(1))]
    for p in range(P + INTERVAL, P + NEW - 1, INTERVAL):  # re-routed when position p is read
        routes.append((p, h[:, p - WINDOW + 1:p + 1].mean(1)))
    return routes


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["adapter", "export"])
def test_cached_generate_owns_its_state_and_equals_full_recompute(tmp_path, kind, strategy):
    t = Harness(kind, strategy, tmp_path)
    ids = torch.randint(3, 61, (2, P), generator=torch.Generator().manual_seed(1))
    calls = {}
    hooks = [t.count(bank, calls, "bank") for bank in t.banks]
    hooks += [t.count(t.branch.attn.k_proj, calls, "k"), t.count(t.branch.attn.v_proj, calls, "v")]
    if strategy != "dense":
        hooks.append(t.count(t.branch.attn.router, calls, "router"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = t.generate(ids)
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]
    for h in hooks:
        h.remove()
    seq, step_logits = out.sequences, torch.stack(out.logits, 1)  # logits of positions P-1 … P+NEW-2
    assert seq.shape[1] == P + NEW
    routes_expected = {"dense": 0, "sequence": 1, "rolling": len(reference_routes(torch.zeros(1, P + NEW, 1), "rolling")),
                       "token": NEW}[strategy]
    assert len(calls["bank"]) == len(t.banks)  # once per generate(), not per step
    projections = {"dense": 1, "sequence": 1, "rolling": routes_expected, "token": 0}[strategy]
    assert len(calls.get("k", [])) == len(calls.get("v", [])) == projections  # memory K/V: once per route
    assert len(calls.get("router", [])) == routes_expected  # token: one call per forward (prompt + NEW-1 steps)

    positions = torch.arange(P - 1, P + NEW - 1)
    with torch.no_grad():
        if strategy in ("dense", "token"):
            reference = t.full(seq)[:, positions]  # token routing: every position routes itself again
        else:
            normed = []
            hook = t.branch.norm.register_forward_hook(lambda m, a, o: normed.append(o))
            t.full(seq)
            hook.remove()
            routes = [(start, t.branch.attn.router(x)) for start, x in reference_routes(normed[0], strategy)]
            for got, (_, want) in zip(calls["router"], routes):
                assert torch.equal(got.chapters, want.chapters)
            reference = torch.empty_like(step_logits)
            router_forward = t.branch.attn.router.forward
            try:
                for n, (start, routing) in enumerate(routes):
                    t.branch.attn.router.forward = lambda x, r=routing: r
                    end = routes[n + 1][0] if n + 1 < len(routes) else P + NEW
                    logits = t.full(seq)
                    for j, p in enumerate(positions.tolist()):
                        if start <= p < end or (n == 0 and p < start):
                            reference[:, j] = logits[:, p]
            finally:
                t.branch.attn.router.forward = router_forward
            unpinned = t.full(seq)[:, positions]  # routing on the whole sequence: other chapters, other logits
            whole = t.branch.attn.router(normed[0].mean(1)).chapters
            if any(not torch.equal(whole, r.chapters) for _, r in routes):  # the pin mattered for this draw
                assert (unpinned - step_logits).abs().max() > 1e-3
    assert (step_logits - reference).abs().max() <= 1e-5
    assert torch.equal(seq[:, P:], reference.argmax(-1))
    if strategy != "dense":  # the memory path really changes the result
        t.branch.attn.output_layer().weight.data.zero_()
        with torch.no_grad():
            assert (t.full(seq)[:, positions] - reference).abs().max() > 1e-2


def test_adapter_decoding_step_without_state_is_refused(tmp_path):
    path, _ = saved_base(tmp_path, "llama")
    model = build_adapter_model(adapter_config(path, *overrides("sequence")), seed=0).eval()
    ids = torch.randint(3, 61, (1, P), generator=torch.Generator().manual_seed(2))
    args = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pytest.raises(DecodingStateError, match=r"outside megamem's decoding state.*model.decoding\(\)"):
        model.base.generate(ids, **args)
    with model.decoding():
        direct = model.base.generate(ids, **args)
    assert torch.equal(direct, model.generate(ids, 4))
    with model.decoding(), pytest.raises(DecodingStateError, match="already open"):
        with model.decoding():
            pass
    with model.decoding(), pytest.raises(DecodingStateError, match="use_cache=False"):
        model.base.generate(ids, use_cache=False, **args)


def test_export_generate_refuses_a_transformers_cache(tmp_path):
    from transformers import DynamicCache

    from megamem.hf.modeling import MegamemForCausalLM
    from megamem.model import build_model

    cfg = tiny_config()
    model = MegamemForCausalLM.from_megamem(build_model(cfg).eval(), cfg)
    with pytest.raises(ValueError, match="keep their own KV cache"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, cache=DynamicCache())
    with pytest.raises(RuntimeError, match="inside its generate"):
        model.prepare_inputs_for_generation(torch.ones(1, 3, dtype=torch.long))


def test_kv_cache_grows_to_its_limit():
    from megamem.model import build_model

    cfg = tiny_config()
    model = build_model(cfg).eval()
    ids = torch.randint(3, 61, (2, 20), generator=torch.Generator().manual_seed(3))
    small, big = model.new_cache(2, 30, capacity=4), model.new_cache(2, 30)
    with torch.no_grad():
        a = torch.cat([model(ids[:, i:i + 3], cache=small).logits for i in range(0, 20, 3)], 1)
        b = model(ids, cache=big).logits
        assert (a - b).abs().max() <= 1e-5
        assert small.layer(0).keys.shape[2] == 30  # 4 → 8 → 16 → 30 (doubled, capped at max_len), not allocated up front
        with pytest.raises(ValueError, match="KV cache holds 30 tokens"):
            model(torch.ones(2, 11, dtype=torch.long), cache=small)
