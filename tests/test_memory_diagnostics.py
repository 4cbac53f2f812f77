"""Is the memory used? Diagnostics (relative norm, attention entropy, rows touched), --ablate-memory and fair
twins, each against an independent reference: attention written out by hand, hand-picked uniform and one-hot
cases, zeroed output layers, a constant bank, and the weights of a vanilla model built from the same seed."""
import json
import math
import os

import pytest
import torch

from conftest import ROOT, tiny_config
from dist_utils import run_ranks
from test_eval_inference import exported, script
from test_train import ZERO, make_cfg
from test_train_features import _records

from megamem.model import build_model
from megamem.model.diagnostics import bank_rows, diagnosing, forward_diagnostics, memory_branches, touched_fraction

MEM = ("memory.wo_init_zero=false", "memory.memory_layer_placement=custom", "memory.memory_layer_indices=[1,3]")


def _model(*overrides):
    torch.manual_seed(0)
    return build_model(tiny_config(*MEM, *overrides))


def _inputs(model, ids):
    """Per memory layer, what its branch read (x) and its bank, captured by hooks."""
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
             for i, b in memory_branches(model)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def _hand_attention(branch, x, bank, rows_of_token=None, bias_of_token=None):
    """(mean entropy, rows read, mean ‖delta‖/‖x‖) of the dense or chapter read, written out per token."""
    attn = branch.attn
    H, KV, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    h = branch.norm(x).reshape(-1, x.shape[-1])
    ents, ratios, rows_read = [], [], None
    for t in range(h.shape[0]):
        rows = bank if rows_of_token is None else bank[rows_of_token[t]]
        q = (h[t] @ attn.q_proj.weight.T).view(H, hd)
        k = (rows @ attn.k_proj.weight.T).view(-1, KV, hd).repeat_interleave(H // KV, 1)  # [R, H, hd]
        v = (rows @ attn.v_proj.weight.T).view(-1, KV, hd).repeat_interleave(H // KV, 1)
        logits = torch.einsum("he,rhe->hr", q, k) / math.sqrt(hd)
        if bias_of_token is not None:
            logits = logits + bias_of_token[t]
        p = logits.softmax(-1)
        ents.append(-(p * p.log()).sum(-1).mean())
        delta = torch.einsum("hr,rhe->he", p, v).reshape(-1) @ attn.o_proj.weight.T
        ratios.append(delta.norm() / x.reshape(-1, x.shape[-1])[t].norm())
        rows_read = rows.shape[0]
    return torch.stack(ents).mean().item(), rows_read, torch.stack(ratios).mean().item()


def test_dense_diagnostics_equal_attention_written_out():
    model = _model()
    ids = torch.randint(0, 61, (2, 16))  # 32 tokens: all of them sampled (SAMPLE_TOKENS = 64)
    seen = _inputs(model, ids)
    with torch.no_grad(), diagnosing(model):
        model(ids)
    got = forward_diagnostics(model)
    assert sorted(got) == [1, 3]
    for i, branch in memory_branches(model):
        ent, rows, ratio = _hand_attention(branch, seen[i], model.banks[branch.bank_index].memory)
        assert rows == 12
        assert abs(got[i]["entropy"].item() - ent) < 1e-5
        assert abs(got[i]["entropy_norm"].item() - ent / math.log(12)) < 1e-5
        assert abs(got[i]["rel_norm"].item() - ratio) < 1e-5
    model(ids)  # off again: a forward outside diagnosing() records nothing new
    assert all(b.diagnose is False and b.attn.diagnose is False for _, b in memory_branches(model))


def test_uniform_attention_gives_log_n_and_one_hot_gives_zero():
    model = _model()
    branch = dict(memory_branches(model))[1]
    with torch.no_grad():
        branch.attn.q_proj.weight.zero_()  # every logit 0: uniform over the 12 rows
    with torch.no_grad(), diagnosing(model):
        model(torch.randint(0, 61, (2, 16)))
    got = forward_diagnostics(model)[1]
    assert abs(got["entropy"].item() - math.log(12)) < 1e-6 and abs(got["entropy_norm"].item() - 1) < 1e-6
    attn, dim = branch.attn, 32
    with torch.no_grad():  # q = x, k = the bank row: row 0 far ahead of every other row
        attn.q_proj.weight.copy_(torch.eye(dim))
        attn.k_proj.weight.copy_(torch.eye(dim))
        bank = torch.full((12, dim), -50.0)
        bank[0] = 50.0
        attn.diagnose = True
        attn(torch.ones(1, 4, dim), bank)
        attn.diagnose = False
    assert attn.diag["entropy"].item() < 1e-6 and attn.diag["entropy_norm"].item() < 1e-6


@pytest.mark.parametrize("strategy", ["sequence", "token"])
def test_chapter_entropy_reads_the_chosen_chapters_rows(strategy):
    model = _model("memory.use_chapters=true", "memory.num_chapters=4", "memory.top_k_chapters=2",
                   "memory.num_memory_tokens=16", f"memory.routing_strategy_train={strategy}")
    routes = {}
    for i, b in memory_branches(model):
        b.attn.router.register_forward_hook(lambda m, a, out, i=i: routes.__setitem__(i, out))
    ids = torch.randint(0, 61, (2, 8))
    seen = _inputs(model, ids)  # the router hooks fire too, with grad off: their bias holds the same value
    with diagnosing(model):  # grad on: the routing's log-gates are applied, as in training
        model(ids)
    got = forward_diagnostics(model)
    for i, branch in memory_branches(model):
        chapters = routes[i].chapters  # [B, m] (sequence) or [B·S, m] (token)
        if strategy == "sequence":
            chapters = chapters.repeat_interleave(8, 0)
        bias = routes[i].bias.detach().repeat_interleave(4, 1)
        if strategy == "sequence":
            bias = bias.repeat_interleave(8, 0)
        rows = [torch.cat([torch.arange(c * 4, c * 4 + 4) for c in row.tolist()]) for row in chapters]
        ent, n_rows, _ = _hand_attention(branch, seen[i], model.banks[0].memory.detach(), rows,
                                         [b[None] for b in bias])
        assert n_rows == 8  # 2 chapters of 4 rows
        assert abs(got[i]["entropy"].item() - ent) < 1e-5
        assert abs(got[i]["entropy_norm"].item() - ent / math.log(8)) < 1e-5


def test_rows_touched_counts_rows_with_gradient():
    model = _model("memory.use_chapters=true", "memory.num_chapters=4", "memory.top_k_chapters=1",
                   "memory.num_memory_tokens=16", "memory.memory_layer_indices=[1]")
    routes = []
    dict(memory_branches(model))[1].attn.router.register_forward_hook(lambda m, a, out: routes.append(out))
    model(torch.randint(0, 61, (1, 8))).logits.sum().backward()
    chosen = routes[0].chapters.unique().numel()  # one sequence, one chapter of the four: its 4 rows of 16
    assert touched_fraction(bank_rows(model)[1].grad) == chosen * 4 / 16 == 0.25
    fresh = build_model(tiny_config("memory.memory_layer_placement=custom", "memory.memory_layer_indices=[1]"))
    fresh(torch.randint(0, 61, (1, 8))).logits.sum().backward()  # wo_init_zero: no bank row gets gradient
    assert touched_fraction(fresh.banks[0].memory.grad) == 0.0


def _diag_run(out, ds):
    from megamem.train.trainer import Trainer
    from synthetic_data import factory

    cfg = make_cfg(out, "training.batch_size=2", "training.max_steps=4", "training.logging_steps=2",
                   "memory.memory_layer_placement=custom", "memory.memory_layer_indices=[1,3]")
    Trainer(cfg, ds, factory(61, 2, 16)).fit()
    return _records(out, "train")


def test_training_logs_the_diagnostics_at_logging_steps(tmp_path):
    records = _diag_run(str(tmp_path / "z0"), ZERO[0])
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        for layer in (1, 3):
            assert 0 < r[f"memory/L{layer}/rel_norm"] < 10
            assert 0 < r[f"memory/L{layer}/entropy_norm"] <= 1 + 1e-6
            assert abs(r[f"memory/L{layer}/entropy"] - r[f"memory/L{layer}/entropy_norm"] * math.log(16)) < 1e-5
            assert r[f"memory/L{layer}/rows_touched"] == 1.0  # dense attention: every row gets gradient
        assert "memory/L0/rel_norm" not in r
    z3 = run_ranks(_diag_run, str(tmp_path / "z3"), ZERO[3], world_size=1, tmp_path=tmp_path / "r3")[0]
    for a, b in zip(records, z3):  # ZeRO-3 (gathered gradients) reports what ZeRO-0 reports
        for k, v in a.items():
            if k.startswith("memory/"):
                assert abs(b[k] - v) < 1e-4, k
    z2 = run_ranks(_diag_run, str(tmp_path / "z2"), ZERO[2], world_size=2, tmp_path=tmp_path / "r2")
    for r in z2[0]:  # two ranks, ZeRO-2: each holds half of every gradient; the full one is gathered
        assert [r[f"memory/L{i}/rows_touched"] for i in (1, 3)] == [1.0, 1.0]
        assert all(0 < r[f"memory/L{i}/entropy_norm"] <= 1 + 1e-6 for i in (1, 3))


def test_ablate_memory_against_hand_zeroed_and_constant_banks(tmp_path, capsys):
    final, _, model, cfg, tok = exported(tmp_path, "data.document_masking=false")
    eval_ = script("eval")
    out = tmp_path / "r.json"
    assert eval_.main(["--model", final, "--ablate-memory", "--no-perplexity", "--output", str(out)]) == 0
    rows = {r["name"]: r for r in json.load(open(out))["ablate_memory"]}
    layers = model.memory_layers
    assert list(rows) == ["on", *[f"layer {i} off" for i in layers], "all off", "mean bank"]
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows)
    from megamem.eval import Loaded, perplexity

    def loss_of(state):  # an independent route: the same weights with output layers zeroed by hand
        m = build_model(cfg).eval()
        m.load_state_dict(state)
        return perplexity(Loaded(m, tok, cfg, m), cfg)["loss"]

    state = model.state_dict()
    assert abs(rows["on"]["loss"] - loss_of(state)) < 1e-6
    for off in [[i] for i in layers] + [layers]:
        zeroed = {k: (v * 0 if any(k == f"blocks.{i}.memory.attn.o_proj.weight" for i in off) else v)
                  for k, v in state.items()}
        name = "all off" if len(off) > 1 else f"layer {off[0]} off"
        assert abs(rows[name]["loss"] - loss_of(zeroed)) < 1e-6
    assert abs(rows["on"]["loss"] - rows["all off"]["loss"]) > 1e-4  # the random memory does change the loss
    # a bank whose rows are all equal is its own mean: "mean bank" equals "on"
    const = {k: (v[:1].expand_as(v).clone() if k.startswith("banks.") else v) for k, v in state.items()}
    from megamem.folders import export_model

    export_model(const, cfg, tok, str(tmp_path / "const"), 1)
    assert eval_.main(["--model", str(tmp_path / "const"), "--ablate-memory", "--no-perplexity",
                       "--output", str(out)]) == 0
    rows = {r["name"]: r for r in json.load(open(out))["ablate_memory"]}
    assert abs(rows["mean bank"]["loss"] - rows["on"]["loss"]) < 1e-6


def test_ablate_memory_refuses_a_model_without_memory(tmp_path, capsys):
    from megamem.cli import run_cli

    final, *_ = exported(tmp_path, "memory.vanilla_mode=true")
    capsys.readouterr()  # the export's progress bars
    assert run_cli(lambda: script("eval").main(["--model", final, "--ablate-memory"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --ablate-memory: this model has no memory layers (a vanilla model); nothing to ablate"]


def _twin_states(stage, seed, tmp):
    """State dicts of a vanilla and a memory model built for this ZeRO stage from one seed (and a memory
    model from another seed)."""
    from megamem.parallel.zero import build_model_for_zero, gathered_state_dict
    from megamem.train.ds_config import resolve_ds_config

    out = []
    for extra, s in ((("memory.vanilla_mode=true",), seed), ((), seed), ((), seed + 1)):
        cfg = tiny_config("memory.use_chapters=true", "memory.num_chapters=4", "memory.top_k_chapters=2",
                          "memory.num_memory_tokens=16", "memory.memory_block_variant=B",
                          f"training.output_dir={tmp}", "training.mixed_precision=no", *extra)
        model = build_model_for_zero(cfg, resolve_ds_config(ZERO[stage], cfg, 1), stage, s)
        state = gathered_state_dict(model, torch.float32, 0) if stage == 3 else model.state_dict()
        out.append({k: v.clone() for k, v in state.items()})
    return out


def _check_twins(vanilla, memory, other_seed):
    assert set(vanilla) < set(memory)
    for k, v in vanilla.items():
        assert torch.equal(v, memory[k]), k  # bitwise: the same base weights
    memory_keys = set(memory) - set(vanilla)
    assert any(k.startswith("banks.") for k in memory_keys) and any(".memory." in k for k in memory_keys)
    assert any(not torch.equal(memory[k], other_seed[k]) for k in memory_keys if k.startswith("banks."))


def test_fair_twins_share_every_non_memory_weight(tmp_path):
    vanilla, memory, other = _twin_states(0, 7, tmp_path)
    _check_twins(vanilla, memory, other)
    again = _twin_states(0, 7, tmp_path)[1]  # memory init is reproducible from the seed
    assert all(torch.equal(v, again[k]) for k, v in memory.items())
    torch.manual_seed(7)  # the plain constructor: the same fairness
    a = build_model(tiny_config("memory.vanilla_mode=true")).state_dict()
    torch.manual_seed(7)
    b = build_model(tiny_config()).state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    z3 = run_ranks(_twin_states, 3, 7, str(tmp_path), world_size=1, tmp_path=tmp_path / "r3")[0]
    _check_twins(*z3)
    for k, v in memory.items():  # ZeRO-3 (built per module, gathered) starts from the plain build's weights
        assert torch.equal(v, z3[1][k]), k


def test_pipeline_reports_diagnostics_unavailable_in_one_line(capsys):
    from megamem.train.diagnostics import PIPELINE_LINE, MemoryDiagnostics

    diag = MemoryDiagnostics(_model(), pipeline=True, rank=0)
    assert not diag.enabled and not diag.begin(True)
    assert capsys.readouterr().out.splitlines() == [PIPELINE_LINE]
    MemoryDiagnostics(_model("memory.vanilla_mode=true"), pipeline=True, rank=0)  # no memory: nothing to say
    assert capsys.readouterr().out == ""
    stage = torch.nn.Linear(2, 2)  # rank 0's stage without a memory layer: the config says the model has some
    MemoryDiagnostics(stage, pipeline=True, rank=0, cfg=tiny_config(*MEM))
    assert capsys.readouterr().out.splitlines() == [PIPELINE_LINE]
    assert os.path.isfile(os.path.join(ROOT, "docs", "diagnostics.md"))
