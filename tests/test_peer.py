"""PEER (megamem/model/mlp/peer.py) against independent references: brute-force top-k over all N
product scores, numpy's ravel_multi_index for the expert ids, a dense PEER written out here (every
expert scored through explicitly concatenated keys), hand-made usage counts, and a whole model
(causality, KV cache) plus a short real training run."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import decode_in_chunks, tiny_config
from dist_utils import run_ranks
from synthetic_data import SyntheticLoader
from test_train import ZERO, make_cfg

from megamem.config.layer_selection import peer_layers
from megamem.model import build_model
from megamem.model.mlp.peer import PEER, expert_id, peer_modules, product_topk, usage_stats


def peer_cfg(sizes=(4, 5), k=3, heads=2, he=1, qdim=6, bn=False, *extra):
    return tiny_config("model.use_peer=true", f"model.peer_config.product_key_dim={list(sizes)}",
                       f"model.peer_config.num_experts={math.prod(sizes)}", f"model.peer_config.num_experts_per_tok={k}",
                       f"model.peer_config.num_heads={heads}", f"model.peer_config.expert_hidden_size={he}",
                       f"model.peer_config.query_dim={qdim}", f"model.peer_config.batch_norm_query={str(bn).lower()}",
                       *extra)


def make_peer(**kw):
    torch.manual_seed(0)
    peer = PEER(peer_cfg(**kw).model, 0)
    with torch.no_grad():  # non-trivial norm affine parameters, so their gradients are checked too
        for p in peer.query_norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return peer


def full_keys(peer):
    """[N, query_dim]: the key of expert e is the concatenation of its sub-keys, in ravel (row-major) order."""
    return torch.stack([torch.cat([key[i] for key, i in zip(peer.sub_keys(), idx)])
                        for idx in itertools.product(*[range(n) for n in peer.sizes])])


def dense_peer(peer, x, k):
    """PEER written out densely: every expert scored, top-k by brute force, softmax over the chosen."""
    q = peer.query(x)
    if peer.batch_norm:
        bn = peer.query_norm
        mean, var = q.mean(0), q.var(0, unbiased=False)
        q = ((q - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias).view(-1, peer.heads, peer.query_dim)
    else:
        q = peer.query_norm(q.view(-1, peer.heads, peer.query_dim))
    scores = torch.einsum("thc,nc->thn", q, full_keys(peer))  # [T, h, N]
    chosen = scores.detach().topk(k, dim=-1).indices
    mask = torch.full_like(scores, float("-inf")).scatter(-1, chosen, 0.0)
    gates = (scores + mask).softmax(-1)  # zero outside the top-k
    he = peer.expert_hidden
    U = peer.expert_down.view(peer.num_experts, he, -1)
    V = peer.expert_up.view(peer.num_experts, he, -1)
    act = F.gelu(torch.einsum("td,ejd->tej", x, U))  # [T, N, he]
    return torch.einsum("the,tej,ejd->td", gates, act, V), chosen


@pytest.mark.parametrize("sizes", [(7, 9), (4, 5, 6)])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_product_topk_equals_brute_force(sizes, k):
    torch.manual_seed(1)
    subs = [torch.randn(3, 2, n) for n in sizes]
    full = subs[0]
    for s in subs[1:]:
        full = (full.unsqueeze(-1) + s.unsqueeze(-2)).flatten(-2)  # row-major: index = ravel of the tuple
    ref_scores, ref_ids = full.topk(k, dim=-1)
    scores, ids = product_topk(subs, k)
    assert torch.allclose(scores, ref_scores, atol=1e-6, rtol=0)
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("sizes", [(4, 5), (3, 4, 5), (2, 2, 3, 2)])
def test_expert_id_is_a_bijection_matching_ravel(sizes):
    tuples = np.array(list(itertools.product(*[range(n) for n in sizes])))
    ids = expert_id([torch.as_tensor(tuples[:, i]) for i in range(len(sizes))], sizes)
    assert torch.equal(ids.sort().values, torch.arange(math.prod(sizes)))  # every expert exactly once
    assert np.array_equal(ids.numpy(), np.ravel_multi_index(tuples.T, sizes))


@pytest.mark.parametrize("bn", [False, True])
def test_every_expert_selected_equals_the_dense_computation(bn):
    peer = make_peer(sizes=(3, 4), k=12, he=2, bn=bn)  # k = N: every expert is chosen
    x = torch.randn(2, 5, 32)
    ref, _ = dense_peer(peer, x.view(-1, 32), 12)
    assert torch.allclose(peer(x).view(-1, 32), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bn", [False, True])
def test_gradients_equal_the_dense_gradients_and_tables_get_only_chosen_rows(bn):
    peer = make_peer(sizes=(4, 5), k=3, he=2, bn=bn)
    x = torch.randn(7, 32)
    target = torch.randn(7, 32)
    ref, chosen = dense_peer(peer, x, 3)
    (ref * target).sum().backward()
    want = {n: p.grad.clone() for n, p in peer.named_parameters()}
    peer.zero_grad()
    (peer(x) * target).sum().backward()
    for name, p in peer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # keys, query, norm, tables all learn
        assert torch.allclose(p.grad, want[name], atol=1e-5, rtol=1e-4), name
    rows = torch.zeros(20 * 2, dtype=torch.bool)
    for e in chosen.unique():
        rows[e * 2: e * 2 + 2] = True
    for table in (peer.expert_down, peer.expert_up):
        assert torch.equal(table.grad.abs().sum(-1) > 0, rows)  # exactly the chosen experts' rows
    assert torch.equal(peer.expert_counts, torch.bincount(chosen.flatten(), minlength=20))


def _sparse_and_dense(bn):
    """The same PEER twice, dense and row-sparse tables (model.peer_config.sparse_tables)."""
    dense = make_peer(sizes=(4, 5), k=3, he=2, bn=bn)
    torch.manual_seed(0)
    sparse = PEER(peer_cfg((4, 5), 3, 2, 2, 6, bn, "model.peer_config.sparse_tables=true").model, 0)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("bn", [False, True])
def test_sparse_tables_gradients_equal_the_dense_ones_on_the_chosen_rows(bn):
    dense, sparse = _sparse_and_dense(bn)
    x, target = torch.randn(7, 32), torch.randn(7, 32)
    _, chosen = dense_peer(dense, x, 3)
    for peer in (dense, sparse):
        (peer(x) * target).sum().backward()
    rows = (chosen.unique()[:, None] * 2 + torch.arange(2)).flatten()  # he = 2 rows per expert
    for name, p in sparse.named_parameters():
        ref = dict(dense.named_parameters())[name].grad
        if "expert_" in name:
            assert p.grad.is_sparse and torch.equal(p.grad.coalesce().indices()[0], rows), name
            assert torch.allclose(p.grad.to_dense(), ref, atol=1e-6, rtol=0), name
        else:
            assert not p.grad.is_sparse and torch.allclose(p.grad, ref, atol=1e-6, rtol=0), name


def test_sparse_tables_row_sparse_adamw_is_adamw_on_the_chosen_rows():
    """Three steps on one batch (same rows chosen): torch's AdamW on dense gradients moves exactly the chosen
    rows as RowSparseAdamW does on the sparse ones; the other rows stay bitwise the same (no decay)."""
    from megamem.train.sparse_adamw import RowSparseAdamW

    dense, sparse = _sparse_and_dense(False)
    x, target = torch.randn(7, 32), torch.randn(7, 32)
    _, chosen = dense_peer(dense, x, 3)
    rows = (chosen.unique()[:, None] * 2 + torch.arange(2)).flatten()
    rest = torch.ones(40, dtype=torch.bool)
    rest[rows] = False
    ref_opt = torch.optim.AdamW([dense.expert_down, dense.expert_up], lr=0.05, weight_decay=0.0)
    opt = RowSparseAdamW([sparse.expert_down, sparse.expert_up], lr=0.05, weight_decay=0.0)
    before = sparse.expert_up.detach().clone()
    for _ in range(3):
        for peer, o in ((dense, ref_opt), (sparse, opt)):
            peer.zero_grad(set_to_none=True)
            (peer(x) * target).sum().backward()
            o.step()
        for a, b in ((dense.expert_down, sparse.expert_down), (dense.expert_up, sparse.expert_up)):
            assert torch.allclose(a[rows], b[rows], atol=1e-6, rtol=0)
    assert not torch.equal(sparse.expert_up[rows], before[rows])
    assert torch.equal(sparse.expert_up[rest], before[rest]) and opt.state[sparse.expert_up]["exp_avg"][rest].eq(0).all()


def test_sparse_tables_refuse_layouts_they_cannot_train():
    from megamem.config import ConfigError
    from megamem.train.ds_config import resolve_ds_config

    cfg = peer_cfg((4, 4), 2, 2, 1, 8, False, "model.peer_config.sparse_tables=true", "training.mixed_precision=no")
    for stage in (1, 2):
        resolve_ds_config(ZERO[stage], cfg, 2)
    for stage in (0, 3):
        with pytest.raises(ConfigError, match="sparse_tables: true trains the expert tables outside"):
            resolve_ds_config(ZERO[stage], cfg, 2)
    with pytest.raises(ConfigError, match="mixed_precision: no"):
        resolve_ds_config(ZERO[2], peer_cfg((4, 4), 2, 2, 1, 8, False, "model.peer_config.sparse_tables=true"), 2)


def test_usage_formulas_on_hand_made_counts():
    assert usage_stats(torch.tensor([1, 1, 1, 1]), 2.0) == {"usage": 1.0, "unevenness": 0.0, "hot_experts": 0,
                                                           "hot_fraction": 0.0}
    one = usage_stats(torch.tensor([4, 0, 0, 0]), 2.0)
    assert one["usage"] == 0.25 and math.isclose(one["unevenness"], math.log(4)) and one["hot_experts"] == 1
    s = usage_stats(torch.tensor([6, 2, 0, 0, 0, 0, 0, 0]), 5.0)  # mean 1: only 6 > 5
    assert s["usage"] == 0.25 and s["hot_experts"] == 1 and s["hot_fraction"] == 0.125
    assert math.isclose(s["unevenness"], math.log(8) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25))


def test_placement_picks_the_layers():
    m = tiny_config("model.num_layers=6").model
    for keys, layers in ((dict(use_peer=False), []), (dict(use_peer=True), [3]),
                         (dict(use_peer=True, peer_start_layer=4), [4, 5]),
                         (dict(use_peer=True, peer_layer_placement="every_n", peer_layer_n=2), [1, 3, 5]),
                         (dict(use_peer=True, peer_layer_placement="custom", peer_layer_indices=[5, 0]), [0, 5])):
        for key, value in keys.items():
            setattr(m, key, value)
        assert peer_layers(m) == layers, keys


def whole_model(bn=True):
    torch.manual_seed(0)
    cfg = peer_cfg((4, 4), 4, 2, 1, 8, bn, "memory.wo_init_zero=false", "model.peer_layer_placement=custom",
                   "model.peer_layer_indices=[1, 2]")
    model = build_model(cfg)
    assert sorted(peer_modules(model)) == [1, 2] and not isinstance(model.blocks[0].mlp, PEER)
    assert len(model.banks) == 1 and model.memory_layers  # PEER together with a memory bank
    return model


def test_whole_model_is_causal_in_eval_mode_and_batch_norm_mixes_tokens_in_training():
    model = whole_model()
    ids = torch.randint(0, 61, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 61
    model.train()
    with torch.no_grad():  # training-mode BatchNorm statistics span the batch's tokens (as in the paper)
        assert not torch.allclose(model(ids).logits[:, :7], model(changed).logits[:, :7])
    model.eval()
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("bn", [False, True])
def test_whole_model_kv_cache_and_generate_equal_the_full_forward(bn):
    model = whole_model(bn).eval()
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        cached = decode_in_chunks(model, ids, [5] + [1] * 8, model.new_cache(2, 20))
        assert torch.allclose(cached, full, atol=1e-5, rtol=0)
        out = model.generate(ids[:, :5], max_new_tokens=6)
        ref = ids[:, :5]
        for _ in range(6):
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def _train(out, extra):
    from megamem.train.trainer import Trainer

    trainer = Trainer(make_cfg(out, "training.batch_size=4", *extra),
                      ZERO[0], lambda split, rank, world: SyntheticLoader(61, 4, 16, rank, world, split))
    result = trainer.fit()
    result["groups"] = {g["name"]: (g["weight_decay"], sorted(g["param_names"])) for g in trainer.groups}
    return result


def test_training_with_peer_lowers_the_loss_and_logs_expert_usage(tmp_path):
    out = str(tmp_path / "run")
    extra = ("model.use_peer=true", "model.peer_layer_placement=middle", "model.peer_config.product_key_dim=[8, 8]",
             "model.peer_config.num_experts=64", "model.peer_config.num_experts_per_tok=4",
             "model.peer_config.num_heads=2", "model.peer_config.query_dim=16", "model.peer_config.log_freq=5",
             "training.max_steps=20", "training.learning_rate=0.01", "training.memory_lr=0.01",
             "training.weight_decay=0.1")
    result = run_ranks(_train, out, extra, world_size=1, tmp_path=tmp_path / "r")[0]
    losses = result["train_losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    decayed = [n for wd, names in result["groups"].values() if wd > 0 for n in names]
    assert "blocks.2.mlp.query.weight" in decayed and not any("expert_" in n for n in decayed)
    records = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == "experts"]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert 0 < r["peer2_usage"] <= 1 and r["peer2_unevenness"] >= 0 and r["peer2_hot_experts"] >= 0
        assert set(r) == {"kind", "step", "peer2_usage", "peer2_unevenness", "peer2_hot_experts", "peer2_hot_fraction"}


def test_zero3_two_ranks_match_one_rank_with_peer(tmp_path):
    """ZeRO-3 partitions the expert tables like any parameter; LayerNorm queries (BatchNorm statistics
    would be per rank), so two ranks of 2 rows compute what one rank of 4 does, usage counts included."""
    from test_train import _fit

    extra = ("model.use_peer=true", "model.peer_config.product_key_dim=[4, 4]", "model.peer_config.num_experts=16",
             "model.peer_config.num_experts_per_tok=3", "model.peer_config.num_heads=2",
             "model.peer_config.query_dim=8", "model.peer_config.batch_norm_query=false",
             "model.peer_config.log_freq=1", "training.max_steps=3")
    one = run_ranks(_fit, str(tmp_path / "one"), ZERO[0], 4, extra, world_size=1, tmp_path=tmp_path / "r1")[0]
    two = run_ranks(_fit, str(tmp_path / "two"), ZERO[3], 2, extra, world_size=2, tmp_path=tmp_path / "r2")
    assert torch.allclose(torch.tensor(two[0]["train_losses"]), torch.tensor(one["train_losses"]), atol=1e-4, rtol=0)
    assert two[0]["group_names"] == one["group_names"] and two[0]["flops_per_token"] == one["flops_per_token"]
    assert "blocks.2.mlp.expert_down" in one["group_names"]["base_no_decay"]
    usage = [[r for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if r["kind"] == "experts"]
             for run in ("one", "two")]
    assert len(usage[0]) == 3 and usage[0] == usage[1]


def test_expert_usage_records_also_go_to_wandb(tmp_path):
    """MetricsLogger sends every record (the experts ones included) to wandb at its step, as to metrics.jsonl."""
    from megamem.train.metrics import MetricsLogger

    log = MetricsLogger(peer_cfg(), str(tmp_path), 0, 10)
    sent = []
    log.wandb = type("Run", (), {"log": lambda self, values, step: sent.append((values, step)),
                                 "finish": lambda self: None})()
    record = {"kind": "experts", "step": 5, "peer2_usage": 0.25, "peer2_unevenness": 0.5, "peer2_hot_experts": 3,
              "peer2_hot_fraction": 0.01}
    log.log(record)
    log.close()
    assert sent == [({k: v for k, v in record.items() if k not in ("kind", "step")}, 5)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == record


def _export_run(out, extra):
    from megamem.train.trainer import Trainer

    Trainer(make_cfg(out, "training.batch_size=2", *extra), ZERO[3],
            lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split)).fit()


def test_exports_hold_only_persistent_state(tmp_path):
    """PEER's expert_counts (per-forward scratch, registered non-persistent) stays out of exports, checkpoints
    read as plain weights and pipeline exports; BatchNorm's running statistics (persistent) go in. The export
    loads back, and converts to a HF folder giving the loaded model's logits."""
    from transformers import AutoModelForCausalLM

    from megamem.hf.convert import convert_to_hf
    from megamem.hf.load import load_exported
    from megamem.parallel.pipeline_state import plain_key_names
    from test_train import _exported

    extra = ("model.use_peer=true", "model.peer_config.product_key_dim=[4, 4]", "model.peer_config.num_experts=16",
             "model.peer_config.num_experts_per_tok=3", "model.peer_config.num_heads=2", "model.peer_config.query_dim=8",
             "model.pos_encoding.type=alibi",  # ALiBi's slopes: a non-persistent buffer too
             "training.max_steps=2")
    run_ranks(_export_run, str(tmp_path / "run"), extra, world_size=1, tmp_path=tmp_path / "r")
    cfg = make_cfg(str(tmp_path / "run"), *extra)
    persistent = set(build_model(cfg).state_dict())  # torch's own account of a module's persistent state
    saved = set(_exported(tmp_path / "run"))
    assert saved == persistent and "blocks.2.mlp.query_norm.running_mean" in saved
    assert not any(k.endswith(("expert_counts", "slopes")) for k in saved)
    assert set(plain_key_names(cfg)) == persistent  # what pipeline exports and init_from expect
    model, _, _ = load_exported(str(tmp_path / "run" / "final"))
    folder = convert_to_hf(str(tmp_path / "run" / "final"), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-5
