"""The masked-denoising objective (training.time_step_masking) and bidirectional attention (model.attention_mode).

References are independent of the code under test: the schedules against their float64 formulas written
out here, masked batches against counts ⌊n·f⌋ computed by hand, bidirectional attention against a dense
float64 softmax(QKᵀ)V and against permutation equivariance, the loss against log V of a model whose
logits are known, and training against the same run's loss before it trained.
"""
import json
import math
import os

import pytest
import torch
import yaml

from conftest import tiny_config
from dist_utils import run_ranks
from synthetic_data import SyntheticLoader
from test_train import ZERO, make_cfg

from megamem.config import ConfigError, load_config
from megamem.config.masking import mask_fractions
from megamem.train.masking import MaskedDenoising, build_objective, mask_batch, seeded

MASKED = ("model.attention_mode=bidirectional", "training.time_step_masking=true")


def masked_config(*extra):
    return tiny_config(*MASKED, *extra)


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_schedules_give_their_formula_values(kind):
    lo, hi, T = 0.15, 0.9, 7
    t = masked_config(f"training.mask_schedule_type={kind}", f"training.min_mask_fraction={lo}",
                      f"training.max_mask_fraction={hi}", f"training.num_time_steps={T}").training
    share = {"linear": lambda p: p, "exponential": lambda p: (math.e ** p - 1) / (math.e - 1),
             "cosine": lambda p: (1 - math.cos(math.pi * p)) / 2}[kind]
    expected = [lo + share(step / (T - 1)) * (hi - lo) for step in range(T)]
    assert mask_fractions(t) == pytest.approx(expected, rel=1e-14, abs=0)
    assert mask_fractions(t)[0] == pytest.approx(lo, abs=1e-15) and mask_fractions(t)[-1] == pytest.approx(hi, abs=1e-15)


def test_schedule_defaults_and_explicit_lists():
    t = masked_config().training  # the source's defaults: 12 steps from 0.1 to 0.99, linear
    assert mask_fractions(t) == pytest.approx([0.1 + i / 11 * 0.89 for i in range(12)], rel=1e-14)
    listed = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]  # the Stack-Wise guide's list
    assert mask_fractions(masked_config(f"training.time_step_mask_fractions={listed}").training) == listed
    assert mask_fractions(masked_config("training.num_time_steps=1").training) == [0.1]


def test_the_phase_picks_the_time_step():
    """Phase p of P blocks uses t = round(p·(T−1)/(P−1)); every batch of that phase masks f_t."""
    base = ("training.mode=blockwise", "training.block_size=1", "training.total_blocks=4", "training.num_time_steps=7")
    fractions = mask_fractions(masked_config(*base).training)
    batch = {"input_ids": torch.arange(40).view(2, 20) + 5, "labels": torch.arange(40).view(2, 20) + 5}
    for phase, step in zip(range(4), (0, 2, 4, 6)):
        cfg = masked_config(*base, f"training.phase={phase}", "training.mask_token_id=3")
        objective = build_objective(cfg, None, 0)
        for s in range(3):
            out, f = objective.train_batch(batch, s, 0, 0)
            assert f == fractions[step]
            assert ((out["input_ids"] == 3).sum(dim=1) == math.floor(20 * fractions[step])).all()


def test_mode_full_draws_the_time_step_per_batch():
    cfg = masked_config("training.time_step_mask_fractions=[0.25, 0.5, 0.75]", "training.mask_token_id=3")
    objective = build_objective(cfg, None, 0)
    batch = {"input_ids": torch.full((1, 8), 7), "labels": torch.full((1, 8), 7)}
    seen = [objective.train_batch(batch, s, 0, 0)[1] for s in range(60)]
    assert set(seen) == {0.25, 0.5, 0.75}
    assert seen == [objective.train_batch(batch, s, 0, 0)[1] for s in range(60)]  # seeded: a resume redraws them


# ---------------------------------------------------------------- masked batches
def test_masked_batch_has_the_mask_token_at_floor_n_f_positions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 61, (6, 40), generator=g)
    labels = ids.clone()
    labels[3, 30:] = -100  # a padded tail: 30 labelled positions
    labels[4, :] = -100  # nothing labelled
    for f in (0.07, 0.3, 0.99, 1.0):
        out = mask_batch({"input_ids": ids, "labels": labels}, f, 3, seeded(1, 2, 3))
        for row in range(6):
            n = int((labels[row] != -100).sum())
            at = out["input_ids"][row] == 3
            expected = max(math.floor(n * f), min(n, 1))
            assert int(at.sum()) == expected, (f, row)
            assert (labels[row][at] != -100).all()  # only labelled positions are masked
            assert torch.equal(out["labels"][row][at], ids[row][at])  # the original tokens are the targets
            assert (out["labels"][row][~at] == -100).all()  # and nothing else is scored
            assert torch.equal(out["input_ids"][row][~at], ids[row][~at])  # the rest of the input is untouched


def test_masks_are_fresh_per_row_and_step_and_reproducible():
    ids = torch.arange(5, 45).repeat(4, 1)
    batch = {"input_ids": ids, "labels": ids.clone()}
    cfg = masked_config("training.mask_token_id=3", "training.time_step_mask_fractions=[0.5]")
    a, b = MaskedDenoising(cfg, None, 0), MaskedDenoising(cfg, None, 1)
    m = [a.train_batch(batch, s, 0, 0)[0]["input_ids"] == 3 for s in range(3)]
    assert len({tuple(row.tolist()) for row in m[0]}) == 4  # rows of one batch: different positions
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[1], m[2])  # every step: a new draw
    assert not torch.equal(m[0], b.train_batch(batch, 0, 0, 0)[0]["input_ids"] == 3)  # every data rank: its own
    assert torch.equal(m[1], a.train_batch(batch, 1, 0, 0)[0]["input_ids"] == 3)  # the same step: the same masks
    assert torch.equal(a.eval_batch(batch, 2)[0]["input_ids"], a.eval_batch(batch, 2)[0]["input_ids"])


def test_every_position_is_masked_equally_often():
    """Uniform without replacement: over 4,000 rows each of 10 positions is masked ⌊10·0.3⌋/10 = 30% of the time."""
    ids = torch.arange(5, 15).repeat(4000, 1)
    out = mask_batch({"input_ids": ids, "labels": ids.clone()}, 0.3, 3, seeded(4))
    rate = (out["input_ids"] == 3).double().mean(dim=0)
    assert ((rate - 0.3).abs() < 0.03).all(), rate  # 4 standard errors (√(0.3·0.7/4000) ≈ 0.0072)


# ---------------------------------------------------------------- bidirectional attention
def _dense(q, k, v, allowed):
    """softmax(QKᵀ/√d) V over the allowed keys, float64, heads broadcast."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("packed", [False, True])
def test_bidirectional_attention_equals_dense_reference(packed):
    from megamem.model.attention.mha import MultiHeadAttention
    from megamem.model.context import forward_context

    cfg = masked_config("model.pos_encoding.type=none")
    attn = MultiHeadAttention(cfg.model, 0).double()
    torch.manual_seed(0)
    B, S, H, KV, hd = 2, 11, 4, 2, 8
    x = torch.randn(B, S, 32, dtype=torch.float64)
    docs = torch.tensor([[0] * 4 + [1] * 7, [0] * 9 + [1] * 2]) if packed else None
    got = attn(x, forward_context(None, S, x.device, x.dtype, document_ids=docs, causal=False))
    w_q, w_k, w_v = attn.qkv_proj.weight.split([H * hd, KV * hd, KV * hd])
    q = (x @ w_q.T).view(B, S, H, hd).transpose(1, 2)
    k = (x @ w_k.T).view(B, S, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
    v = (x @ w_v.T).view(B, S, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
    allowed = torch.ones(B, 1, S, S, dtype=torch.bool) if docs is None else (docs[:, :, None] == docs[:, None, :])[:, None]
    want = _dense(q, k, v, allowed).transpose(1, 2).reshape(B, S, H * hd) @ attn.o_proj.weight.T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    causal = attn(x, forward_context(None, S, x.device, x.dtype, document_ids=docs))
    assert not torch.allclose(causal, want)  # the switch matters: query 0 saw later keys


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_bidirectional_model_is_permutation_equivariant(attention):
    """Without positions, bidirectional attention sees a set: permuting the tokens permutes the logits.
    A causal model does not have this property (a token's context is its prefix)."""
    from megamem.model import build_model

    mla = ("model.attention_type=mla", "model.mla_config.kv_lora_rank=16", "model.mla_config.qk_rope_head_dim=4",
           "model.mla_config.qk_nope_head_dim=8", "model.mla_config.v_head_dim=8", "model.num_kv_heads=null")
    extra = ("model.pos_encoding.type=none", "memory.vanilla_mode=true", *(mla if attention == "mla" else ()))
    torch.manual_seed(0)
    ids, perm = torch.randint(0, 61, (2, 13)), torch.randperm(13)
    for mode in ("bidirectional", "causal"):
        cfg = tiny_config(f"model.attention_mode={mode}", f"training.time_step_masking={mode == 'bidirectional'}",
                          *extra)
        model = build_model(cfg).double().eval()
        with torch.no_grad():
            a, b = model(ids).logits[:, perm], model(ids[:, perm]).logits
        assert torch.allclose(a, b, atol=1e-10) == (mode == "bidirectional")


# ---------------------------------------------------------------- the loss
def _copy_model():
    """A model that outputs its input token: one-hot embeddings (the mask token's row zero), blocks that add
    nothing (zero output layers), lm_head = 5·I. At a masked position it sees a zero vector: uniform logits."""
    from megamem.model import build_model

    cfg = masked_config("model.hidden_dim=64", "memory.vanilla_mode=true", "model.vocab_size=61",
                        "training.mask_token_id=3")
    model = build_model(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.tok_embeddings.weight.copy_(torch.eye(61, 64, dtype=torch.float64))
        model.tok_embeddings.weight[3] = 0
        model.lm_head.weight.copy_(5 * torch.eye(61, 64, dtype=torch.float64))
    return cfg, model


def test_an_identity_model_scores_log_v_on_masked_positions():
    cfg, model = _copy_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 61, (4, 32), generator=g)
    objective = MaskedDenoising(cfg, None, 0)
    masked, f = objective.train_batch({"input_ids": ids, "labels": ids.clone()}, 0, 0, 0)
    with torch.no_grad():
        loss = model(masked["input_ids"], labels=masked["labels"]).loss.item()
        # the source's bug: targets at masked positions while the input still holds them — copying is free
        leaked = model(ids, labels=masked["labels"]).loss.item()
        # a model with zero logits everywhere: log V whatever it sees
        model.lm_head.weight.zero_()
        uniform = model(masked["input_ids"], labels=masked["labels"]).loss.item()
    assert loss == pytest.approx(math.log(61), abs=1e-6)  # the loss runs in float32
    assert uniform == pytest.approx(math.log(61), abs=1e-6)
    assert leaked < 1e-6  # logit ≈ 5·√64 on the copied token, 0 on the 60 others: e^−40 per position


# ---------------------------------------------------------------- training
STEPS = 300


def _train(out):
    from megamem.train.trainer import Trainer

    cfg = make_cfg(out, *MASKED, "model.vocab_size=62", "training.mask_token_id=61", f"training.max_steps={STEPS}",
                   "training.learning_rate=0.01", "training.memory_lr=0.01", "training.batch_size=8",
                   "training.scheduler=constant", "training.time_step_mask_fractions=[0.2, 0.4]",
                   "training.eval_max_batches=3", "training.logging_steps=10")
    trainer = Trainer(cfg, ZERO[0], lambda split, rank, world: SyntheticLoader(61, 8, 16, rank, world, split))
    before = trainer.evaluate()
    result = trainer.fit()
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return before, result, records


def test_masked_training_lowers_the_masked_loss(tmp_path):
    before, result, records = run_ranks(_train, str(tmp_path / "run"), world_size=1, tmp_path=tmp_path / "r")[0]
    after = result["eval"]
    # the same eval batches with the same masks (seeded by batch index) before and after training
    assert before["eval_tokens"] == after["eval_tokens"]
    assert before["eval_loss"] == pytest.approx(math.log(62), abs=0.3)  # untrained: about uniform
    assert after["eval_loss"] < before["eval_loss"] - 1.0, (before, after)
    train = [r for r in records if r.get("kind") == "train"]
    assert len(train) == STEPS // 10 and all(r["mask_fraction"] in (0.2, 0.4) for r in train)
    assert {r["mask_fraction"] for r in train} == {0.2, 0.4}  # t drawn per batch (mode full)
    means = {round((a + b + c) / 3, 12) for a in (0.2, 0.4) for b in (0.2, 0.4) for c in (0.2, 0.4)}
    assert round(after["eval_mask_fraction"], 12) in means


# ---------------------------------------------------------------- refusals
def test_a_mask_token_is_required():
    cfg = masked_config()
    with pytest.raises(ConfigError, match="training.time_step_masking needs a mask token: set training.mask_token_id"):
        MaskedDenoising(cfg, None, 0)

    class WithMask:
        mask_token_id = 70

    with pytest.raises(ConfigError, match=r"mask token id 70 is outside the vocabulary \[0, 61\)"):
        MaskedDenoising(cfg, WithMask(), 0)
    WithMask.mask_token_id = 7
    assert MaskedDenoising(cfg, WithMask(), 0).mask_token_id == 7


def test_bidirectional_models_refuse_decoding():
    from megamem.model import build_model

    model = build_model(masked_config())
    ids = torch.randint(0, 61, (1, 5))
    with pytest.raises(ConfigError, match=r"generate\(\) \(decoding with a KV cache\) needs a causal model"):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(ConfigError, match="a KV cache needs a causal model"):
        model(ids, cache=model.new_cache(1, 16))


def test_pipelines_refuse_masking():
    from megamem.train.ds_config import layout_problems

    ds = {"pipeline": {"stages": 2}, "zero_optimization": {"stage": 0}}
    problems = layout_problems(masked_config("training.mask_token_id=3"), ds, False, world_size=2)
    assert problems == ["training.time_step_masking is not wired for pipeline stages (their loss is the causal one); "
                        "use ZeRO-0/1/2/3 without a pipeline"]


def test_stack_wise_masked_config_converts(tmp_path):
    from megamem.config.migrate import migrate

    text = """
model: {vocab_size: 512, d_model: 64, n_layers: 4, n_heads: 4, d_ff: 96, attention_mode: bidirectional}
training: {mode: fused, fusion_mode: frozen, total_blocks: 2, block_size: 2, time_step_masking: true,
           num_time_steps: 4, min_mask_fraction: 0.1, max_mask_fraction: 0.9, mask_schedule_type: cosine,
           mask_token_id: 3}
"""
    _, data, problems, _ = migrate(yaml.safe_load(text))
    assert not problems
    out = str(tmp_path / "sw.yaml")
    open(out, "w").write(yaml.safe_dump(data))
    cfg = load_config(out)
    t = cfg.training
    assert cfg.model.attention_mode == "bidirectional"
    assert (t.time_step_masking, t.num_time_steps, t.mask_schedule_type, t.mask_token_id) == (True, 4, "cosine", 3)
    assert mask_fractions(t) == pytest.approx([0.1 + (1 - math.cos(math.pi * i / 3)) / 2 * 0.8 for i in range(4)],
                                              rel=1e-14)


def test_bidirectional_adapters_are_refused():
    with pytest.raises(ConfigError, match=r"model.attention_mode: bidirectional builds from-scratch models; an adapter "
                                          r"run \(model.base_model_name\) keeps its pretrained model's causal attention"):
        masked_config("model.base_model_name=some/model", "training.mask_token_id=3")


def _masked_resume_run(out, extra, stop_after=None):
    from test_train import _resume_run

    return _resume_run(out, ZERO[1], (*MASKED, "model.vocab_size=62", "training.mask_token_id=61",
                                      "training.time_step_mask_fractions=[0.25, 0.5]", *extra), stop_after)


def test_preempt_and_resume_draws_the_same_masks(tmp_path):
    """Masks are seeded by step and micro-batch: a run resumed from step 5 (of 10, 2 micro-batches a step)
    reproduces the unbroken run's masked losses."""
    full = run_ranks(_masked_resume_run, str(tmp_path / "a"), (), world_size=1, tmp_path=tmp_path / "r1")[0]
    first = run_ranks(_masked_resume_run, str(tmp_path / "b"), (), 5, world_size=1, tmp_path=tmp_path / "r2")[0]
    assert first["preempted"] and first["train_losses"] == full["train_losses"][:5]
    resumed = run_ranks(_masked_resume_run, str(tmp_path / "b"), ("training.resume_from_checkpoint=latest",),
                        world_size=1, tmp_path=tmp_path / "r3")[0]
    assert resumed["steps"] == 10
    torch.testing.assert_close(torch.tensor(resumed["train_losses"]), torch.tensor(full["train_losses"][5:]),
                               atol=1e-6, rtol=0)
