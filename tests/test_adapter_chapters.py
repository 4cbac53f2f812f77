"""Chapter routing in memory adapters: identity at zero-init, HF generate() with its KV cache against
full-forward recomputation (token and sequence routing), router gradients and losses, training."""
import json

import pytest
import torch

from adapter_utils import FAMILY_CONFIGS, VOCAB, adapter_config, saved_base
from dist_utils import run_ranks
from synthetic_data import factory

from megamem.adapter import build_adapter_model
from megamem.config import ConfigError
from megamem.memory.router import router_losses

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
CHAPTERS = ("memory.use_chapters=true", "memory.num_memory_tokens=24", "memory.num_chapters=6",
            "memory.top_k_chapters=2", "memory.num_shared_chapters=1")


def strategy(name):
    return (f"memory.routing_strategy_train={name}", f"memory.routing_strategy_inference={name}")


def chapter_adapter(path, *overrides, randomise=True):
    model = build_adapter_model(adapter_config(path, *CHAPTERS, *overrides), seed=0).eval()
    if randomise:  # memory changes the logits, and routing really varies between tokens and layers
        for branch in model.branches.values():
            torch.nn.init.normal_(branch.attn.output_layer().weight, std=0.3)
            torch.nn.init.normal_(branch.attn.router.weight, std=1.0)
    return model


def generate_with_logits(model, ids, steps):
    out = model.generate(ids, steps, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_zero_init_chapter_adapter_equals_base(tmp_path, family, routing):
    path, base = saved_base(tmp_path, family)
    model = chapter_adapter(path, *strategy(routing), randomise=False)
    for branch in model.branches.values():
        torch.nn.init.normal_(branch.attn.router.weight, std=1.0)
    with torch.no_grad():
        out = model(IDS)
        assert torch.equal(out.logits, base(IDS).logits)
    assert set(out.chapter_usage) == set(model.memory_layers)
    expected = base.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(model.generate(IDS, 5), expected)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_token_routing_generate_with_kv_cache_equals_full_forward(tmp_path, family):
    path, base = saved_base(tmp_path, family)
    model = chapter_adapter(path, *strategy("token"), "memory.memory_sharing=per_layer")
    seq, step_logits = generate_with_logits(model, IDS, 8)
    with torch.no_grad():
        full = model(seq).logits  # no cache: every position routes itself again
        assert (full - base(seq).logits).abs().max() > 1e-2  # memory is really in the path
    P = IDS.shape[1]
    assert (step_logits - full[:, P - 1:-1]).abs().max() <= 1e-5
    assert torch.equal(seq[:, P:], full[:, P - 1:-1].argmax(-1))  # greedy decoding of the recomputed logits


def test_sequence_routing_keeps_the_prompts_chapters_while_decoding(tmp_path):
    path, _ = saved_base(tmp_path, "qwen2")
    model = chapter_adapter(path, *strategy("sequence"), "memory.memory_sharing=per_layer")
    routes = {i: [] for i in model.memory_layers}
    handles = [model.branches[str(i)].attn.router.register_forward_hook(
        lambda m, a, out, i=i: routes[i].append(out)) for i in model.memory_layers]
    seq, step_logits = generate_with_logits(model, IDS, 7)
    for h in handles:
        h.remove()
    assert all(len(r) == 1 for r in routes.values())  # routed once per layer, on the prompt
    # reference: full forwards without cache whose every layer reads the prompt's chapters
    for i in model.memory_layers:
        model.branches[str(i)].attn.router.forward = lambda h, r=routes[i][0]: r
    P = IDS.shape[1]
    with torch.no_grad():
        full = model(seq).logits
    assert (step_logits - full[:, P - 1:-1]).abs().max() <= 1e-5
    assert torch.equal(seq[:, P:], full[:, P - 1:-1].argmax(-1))
    for i in model.memory_layers:
        del model.branches[str(i)].attn.router.forward
    with torch.no_grad():  # re-routing on the whole sequence picks other chapters: the kept choice matters
        assert (model(seq).logits[:, P - 1:-1] - step_logits).abs().max() > 1e-3


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_router_gradients_losses_and_usage(tmp_path, routing):
    path, _ = saved_base(tmp_path, "llama")
    model = chapter_adapter(path, *strategy(routing), "memory.use_z_loss=true", "memory.shared_router=false").train()
    seen = {}
    for i in model.memory_layers:
        model.branches[str(i)].attn.router.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    out = model(IDS, labels=IDS)
    cfg = model.memory_config
    expected = {}
    for i in model.memory_layers:  # the model's router losses are the per-layer losses, averaged
        for name, value in router_losses(seen[i], cfg).items():
            expected[name] = expected.get(name, 0.0) + value / len(model.memory_layers)
        units = IDS.numel() if routing == "token" else IDS.shape[0]
        assert torch.equal(out.chapter_usage[i], torch.bincount(seen[i].chapters.flatten(), minlength=6))
        assert out.chapter_usage[i].sum() == units * 3 and out.chapter_usage[i][0] == units  # shared chapter 0
    assert set(out.aux_losses) == {"load_balance_loss", "z_loss"}
    for name, value in expected.items():
        assert torch.allclose(out.aux_losses[name], value)
    (out.loss + sum(out.aux_losses.values())).backward()
    for i in model.memory_layers:
        grad = model.branches[str(i)].attn.router.weight.grad
        assert grad is not None and grad.abs().max() > 0


def test_shared_router_is_one_module(tmp_path):
    path, _ = saved_base(tmp_path, "llama")
    model = chapter_adapter(path, "memory.shared_router=true", randomise=False)
    routers = {id(model.branches[str(i)].attn.router) for i in model.memory_layers}
    assert len(routers) == 1 and len(model.memory_layers) == 3


def _fit(out, base_path, routing):
    from megamem.train.trainer import Trainer

    cfg = adapter_config(base_path, *CHAPTERS, *strategy(routing), "training.mixed_precision=no",
                         "training.max_length=16", "training.warmup_steps=1", "training.max_steps=8",
                         "training.logging_steps=1", "training.eval_steps=1000", "training.save_steps=1000",
                         "training.memory_lr=0.05", "training.batch_size=4", f"training.output_dir={out}")
    trainer = Trainer(cfg, None, factory(VOCAB, 4, 16))
    before = trainer.model.branches["0"].attn.router.weight.detach().clone()
    result = trainer.fit()
    result["router_moved"] = not torch.equal(trainer.model.branches["0"].attn.router.weight, before)
    return result


def test_chapter_adapter_trains_through_the_trainer(tmp_path):
    """Token routing (sequence routing's gradients are covered above); the trainer adds the router loss."""
    path, _ = saved_base(tmp_path, "llama", initializer_range=0.5)
    result = run_ranks(_fit, str(tmp_path / "run"), path, "token", world_size=1, tmp_path=tmp_path / "r")[0]
    losses = result["train_losses"]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses
    assert result["router_moved"]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 8 and all(r["load_balance_loss"] > 0 for r in train)
    assert all(r["loss"] == pytest.approx(r["lm_loss"] + r["load_balance_loss"]) for r in train)


def test_chapter_adapter_refused_under_zero3(tmp_path):
    from conftest import ROOT
    from megamem.train.ds_config import resolve_ds_config

    cfg = adapter_config(str(tmp_path), *CHAPTERS)
    with pytest.raises(ConfigError, match="use_chapters on an adapter model .* ZeRO stage 0, 1 or 2"):
        resolve_ds_config(f"{ROOT}/ds_configs/zero3.json", cfg, 2)


def test_chapter_adapter_export_reloads_to_the_same_logits(tmp_path):
    from megamem.adapter import load_adapter, save_adapter

    path, _ = saved_base(tmp_path, "qwen3")
    model = chapter_adapter(path, *strategy("token"), "memory.shared_router=true")
    save_adapter(model, model.adapter_config, str(tmp_path / "ad"))
    loaded, _, _ = load_adapter(str(tmp_path / "ad"))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_chapter_adapter_refuses_expert_parallel(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.ep_size = 2: expert-parallel chapter shards are for from-scratch"):
        adapter_config(str(tmp_path), *CHAPTERS, "parallel.ep_size=2")


@pytest.mark.parametrize("branch_checkpointing", [False, True])
def test_gradient_checkpointing_gives_the_same_router_gradients(tmp_path, branch_checkpointing):
    """HF checkpointing of the base's layers, and memory_gradient_checkpointing of the branch itself."""
    path, _ = saved_base(tmp_path, "llama")
    grads = []
    for checkpointed in (False, True):
        model = chapter_adapter(path, *strategy("token"), "memory.use_z_loss=true",
                                f"memory.memory_gradient_checkpointing={checkpointed and branch_checkpointing}").train()
        model.gradient_checkpointing = checkpointed
        out = model(IDS, labels=IDS)
        (out.loss + sum(out.aux_losses.values())).backward()
        grads.append(torch.cat([model.branches[str(i)].attn.router.weight.grad.flatten() for i in model.memory_layers]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[1], grads[0], atol=1e-6)


def test_rolling_routing_reroutes_at_the_interval_on_the_recent_window(tmp_path):
    path, _ = saved_base(tmp_path, "llama")
    model = chapter_adapter(path, "memory.routing_strategy_inference=rolling", "memory.rolling_interval=3",
                            "memory.rolling_window=4", "memory.memory_sharing=per_layer")
    hidden = {}
    for i in model.memory_layers:  # the normed hidden states the router sees
        model.branches[str(i)].norm.register_forward_hook(lambda m, a, out, i=i: hidden.setdefault(i, []).append(out))
    with model.decoding() as decoding:  # HF generate() called directly, inside megamem's decoding state
        model.base.generate(IDS[:, :5], attention_mask=torch.ones_like(IDS[:, :5]), max_new_tokens=11,
                            do_sample=False, pad_token_id=0)  # forwards: the prompt, then one token at lengths 5..14
    for i in model.memory_layers:
        state = decoding.layer(i).state["routing"]  # the routing state of that generation
        assert state["routes"] == [0, 8, 11, 14]  # the prompt, then every 3 generated tokens
        seen = torch.cat(hidden[i], 1)
        assert seen.shape[1] == 15
        expected = model.branches[str(i)].attn.router(seen[:, 11:15].mean(1)).chapters  # the last 4 tokens
        assert torch.equal(state["routing"].chapters, expected)
