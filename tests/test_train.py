"""Training through the DeepSpeed engine on CPU ranks: ZeRO-3 parity, resume, crash safety, logging."""
import json
import os
import signal

import pytest
import torch

from megamem.config import ConfigError

from conftest import ROOT, tiny_config
from dist_utils import run_ranks
from synthetic_data import factory

ZERO = {s: os.path.join(ROOT, "ds_configs", f"zero{s}.json") for s in (0, 1, 2, 3)}
SYN = ("memory.wo_init_zero=false", "training.mixed_precision=no", "training.max_length=16", "training.warmup_steps=2",
       "training.logging_steps=1", "training.eval_steps=1000", "training.save_steps=1000", "memory.num_memory_tokens=16")


def make_cfg(out, *extra):
    return tiny_config(*SYN, f"training.output_dir={out}", *extra)


def _fit(out, ds, batch, extra):
    from megamem.train.trainer import Trainer

    trainer = Trainer(make_cfg(out, f"training.batch_size={batch}", *extra), ds, factory(61, batch, 16))
    result = trainer.fit()
    if len(trainer.model.banks):
        bank = trainer.model.banks[0].memory
        result["bank_local"] = bank.ds_tensor.numel() if hasattr(bank, "ds_tensor") else bank.numel()
        result["bank_total"] = bank.ds_numel if hasattr(bank, "ds_numel") else bank.numel()
    result["groups"] = {g["name"]: (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups}
    result["group_names"] = {g["name"]: sorted(g["param_names"]) for g in trainer.groups}
    from megamem.train.metrics import flops_per_token

    result["flops_per_token"] = flops_per_token(trainer.model, 16, 4)  # one batch size for every layout
    return result


def test_zero3_two_ranks_match_one_rank(tmp_path):
    steps = ("training.max_steps=5",)
    one = run_ranks(_fit, str(tmp_path / "one"), ZERO[0], 4, steps, world_size=1, tmp_path=tmp_path / "r1")[0]
    two = run_ranks(_fit, str(tmp_path / "two"), ZERO[3], 2, steps, world_size=2, tmp_path=tmp_path / "r2")
    for rank in two:
        assert rank["bank_local"] * 2 == rank["bank_total"] == 16 * 32  # each rank stores half the bank
    assert one["train_losses"][0] > one["train_losses"][-1]
    assert torch.allclose(torch.tensor(two[0]["train_losses"]), torch.tensor(one["train_losses"]), atol=1e-4, rtol=0)
    # weight decay decided by each parameter's full shape, not its (flat, partitioned) ZeRO-3 shard
    assert two[0]["group_names"] == two[1]["group_names"] == one["group_names"]
    assert two[0]["groups"] == one["groups"] and two[0]["groups"]["base"][1] > 0
    assert two[0]["flops_per_token"] == one["flops_per_token"]  # MFU counts whole parameters, not ZeRO-3 shards
    assert "blocks.0.attn.qkv_proj.weight" in two[0]["group_names"]["base"]
    assert "norm.weight" in two[0]["group_names"]["base_no_decay"]


def _preempt_during(step):
    """Send this process SIGUSR1 (a preemption notice) while it trains `step`."""
    from megamem.train.trainer import Trainer

    original = Trainer.train_step

    def step_and_signal(self, batches):
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, batches)

    Trainer.train_step = step_and_signal


def _resume_run(out, ds, extra, stop_after=None):
    if stop_after is not None:
        _preempt_during(stop_after)
    return _fit(out, ds, 2, ("training.gradient_accumulation_steps=2", "training.save_steps=1000",
                             "training.max_steps=10", *extra))


def test_preempt_and_resume_equals_unbroken_run(tmp_path):
    full = run_ranks(_resume_run, str(tmp_path / "a"), ZERO[1], (), world_size=1, tmp_path=tmp_path / "r1")[0]
    first = run_ranks(_resume_run, str(tmp_path / "b"), ZERO[1], (), 5, world_size=1, tmp_path=tmp_path / "r2")[0]
    assert first["preempted"] and first["steps"] == 5
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step00000005"
    assert not (tmp_path / "b" / "final").exists()
    resumed = run_ranks(_resume_run, str(tmp_path / "b"), ZERO[1], ("training.resume_from_checkpoint=latest",),
                        world_size=1, tmp_path=tmp_path / "r3")[0]
    assert first["train_losses"] == full["train_losses"][:5]
    assert resumed["steps"] == 10 and len(resumed["train_losses"]) == 5
    assert torch.allclose(torch.tensor(resumed["train_losses"]), torch.tensor(full["train_losses"][5:]), atol=1e-6,
                          rtol=0)


def _die_during_second_save(out):
    from megamem.train import checkpoint

    original = checkpoint._atomic_write

    def write_then_maybe_die(path, text):
        if "step00000004" in path and os.path.basename(path).startswith("run_state"):
            os.kill(os.getpid(), signal.SIGKILL)  # engine files of step 4 are on disk, the commit is not
        original(path, text)

    checkpoint._atomic_write = write_then_maybe_die
    _fit(out, ZERO[3], 2, ("training.max_steps=6", "training.save_steps=2"))


def test_kill_during_save_keeps_latest_on_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(AssertionError, match=r"exit codes \[-9, -9\]"):
        run_ranks(_die_during_second_save, str(out), world_size=2, tmp_path=tmp_path / "r1")
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    assert (ckpt / "step00000004").is_dir() and not (ckpt / "step00000004" / "COMPLETE").exists()
    unbroken = run_ranks(_fit, str(tmp_path / "u"), ZERO[3], 2, ("training.max_steps=6",), world_size=2,
                         tmp_path=tmp_path / "r2")[0]
    resumed = run_ranks(_fit, str(out), ZERO[3], 2, ("training.max_steps=6", "training.resume_from_checkpoint=latest"),
                        world_size=2, tmp_path=tmp_path / "r3")[0]
    assert torch.allclose(torch.tensor(resumed["train_losses"]), torch.tensor(unbroken["train_losses"][2:]), atol=1e-6,
                          rtol=0)
    assert (ckpt / "latest").read_text() == "step00000006"
    # the log reads as one run: the killed run's records of steps 3-4 (redone) were dropped on resume
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert torch.allclose(torch.tensor([r["lm_loss"] for r in train]), torch.tensor(unbroken["train_losses"]),
                          atol=1e-6, rtol=0)


def _nan_run(out, bad_calls, max_bad):
    from megamem.train.trainer import Trainer

    trainer = Trainer(make_cfg(out, "training.max_steps=4", f"training.max_nonfinite_steps={max_bad}"), None,
                      factory(61, 2, 16))
    forward, calls = trainer._forward, [0]

    def poisoned(batch):
        calls[0] += 1
        out = forward(batch)
        if calls[0] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    trainer._forward = poisoned
    try:
        return trainer.fit()
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{type(e).__name__}: {e}"


def test_nonfinite_loss_is_skipped_then_aborts(tmp_path):
    ok = run_ranks(_nan_run, str(tmp_path / "a"), {2}, 3, world_size=1, tmp_path=tmp_path / "r1")[0]
    assert ok["skipped_nonfinite"] == 1 and ok["steps"] == 4 and all(map(torch.isfinite, torch.tensor(ok["train_losses"])))
    bad = run_ranks(_nan_run, str(tmp_path / "b"), {2, 3, 4}, 3, world_size=1, tmp_path=tmp_path / "r2")[0]
    assert bad.startswith("NonFiniteLossError: loss was NaN/inf on 3 micro-batches in a row at step 2")


def _logged_run(out):
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    return _fit(out, ZERO[2], 2, ("training.max_steps=3", "training.log_to_wandb=true", "training.eval_steps=3",
                                  "training.memory_lr=0.01", "training.learning_rate=0.002",
                                  "training.weight_decay=0.1"))


def test_metrics_jsonl_wandb_offline_and_groups(tmp_path):
    result = run_ranks(_logged_run, str(tmp_path / "run"), world_size=1, tmp_path=tmp_path / "r")[0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "skipped_nonfinite",
                "lr_memory", "lr_base", "lr_memory_no_decay", "lr_base_no_decay"):
        assert key in train[0], key
    assert [r["eval_loss"] for r in records if r["kind"] == "eval"] == [result["eval"]["eval_loss"]]
    assert train[0]["lr_memory"] / train[0]["lr_base"] == pytest.approx(5.0)
    assert result["groups"]["memory"][1] == 0.1 and result["groups"]["memory_no_decay"][1] == 0.0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def _data_run(out, tok_dir, path, extra, stop_after=None):
    """A run on real text through megamem.data (streaming jsonl), like scripts/train.py does."""
    from megamem.data import build_loader, load_tokenizer
    from megamem.train.trainer import Trainer

    if stop_after is not None:
        _preempt_during(stop_after)
    cfg = tiny_config(*SYN, f"training.output_dir={out}", f"model.tokenizer_name={tok_dir}", "model.vocab_size=400",
                      "training.max_length=32", "training.batch_size=2", "training.gradient_accumulation_steps=2",
                      "training.max_steps=8", "training.eval_steps=4", "training.eval_max_batches=2",
                      f"data.datasets=[{{path: {path}, eval_path: {path}, streaming: true}}]", "data.shuffle_buffer=8",
                      *extra)
    tok = load_tokenizer(cfg)
    trainer = Trainer(cfg, ZERO[2], lambda split, r, w: build_loader(cfg, tok, split, r, w), tokenizer=tok)
    return trainer.fit()


def test_streaming_data_preempt_resume_two_ranks(tmp_path):
    from data_utils import make_docs, tokenizer_dir, write_jsonl

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(40)])
    args = (tokenizer_dir(), str(path))
    full = run_ranks(_data_run, str(tmp_path / "a"), *args, (), world_size=2, tmp_path=tmp_path / "r1")[0]
    first = run_ranks(_data_run, str(tmp_path / "b"), *args, (), 3, world_size=2, tmp_path=tmp_path / "r2")[0]
    resumed = run_ranks(_data_run, str(tmp_path / "b"), *args, ("training.resume_from_checkpoint=latest",),
                        world_size=2, tmp_path=tmp_path / "r3")[0]
    assert first["preempted"] and first["train_losses"] == full["train_losses"][:3]
    assert torch.allclose(torch.tensor(resumed["train_losses"]), torch.tensor(full["train_losses"][3:]), atol=1e-6,
                          rtol=0)
    assert resumed["eval"]["eval_loss"] == pytest.approx(full["eval"]["eval_loss"], abs=1e-6)
    assert (tmp_path / "b" / "checkpoints" / "step00000003" / "tokenizer" / "tokenizer.json").is_file()


CHAPTERS = ("memory.use_chapters=true", "memory.num_chapters=4", "memory.top_k_chapters=2",
            "memory.routing_strategy_train=token", "memory.use_z_loss=true")


def _chapter_run(out, ep_size, extra):
    return _fit(out, ZERO[2], 2, ("training.max_steps=4", "training.save_steps=2", f"parallel.ep_size={ep_size}",
                                  *CHAPTERS, *extra))


def test_chapters_train_and_resume(tmp_path):
    full = run_ranks(_chapter_run, str(tmp_path / "a"), 1, (), tmp_path=tmp_path / "r1")[0]
    assert all(r["kind"] != "train" or "z_loss" in r for r in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")))
    resumed = run_ranks(_chapter_run, str(tmp_path / "a"), 1,
                        ("training.resume_from_checkpoint=" + str(tmp_path / "a" / "checkpoints" / "step00000002"),),
                        tmp_path=tmp_path / "r2")[0]
    assert torch.allclose(torch.tensor(resumed["train_losses"]), torch.tensor(full["train_losses"][2:]), atol=1e-6,
                          rtol=0)


def test_chapters_zero3_two_ranks_match_one_rank(tmp_path):
    """Routed attention reads projection weights outside their modules: ZeRO-3 must gather them too."""
    steps = ("training.max_steps=4", *CHAPTERS)
    one = run_ranks(_fit, str(tmp_path / "one"), ZERO[0], 4, steps, world_size=1, tmp_path=tmp_path / "r1")[0]
    two = run_ranks(_fit, str(tmp_path / "two"), ZERO[3], 2, steps, world_size=2, tmp_path=tmp_path / "r2")[0]
    # the load-balance loss is not linear in the batch, so per-rank halves differ from the whole batch slightly
    assert torch.allclose(torch.tensor(two["train_losses"]), torch.tensor(one["train_losses"]), atol=1e-4, rtol=0)


def _banks_run(out, stage, ep_size, extra):
    return _fit(out, ZERO[stage], 2, ("training.max_steps=4", "training.save_steps=2", f"parallel.ep_size={ep_size}",
                                      *CHAPTERS, *extra))


def _exported(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _close(a, b, atol):
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


def test_expert_parallel_trains_resumes_and_exports_like_ep1(tmp_path):
    """ep_size 2 through the trainer: the losses and the export (whole banks) of ep_size 1; resume is exact."""
    off = ("training.max_grad_norm=0",)  # ep_size 1 clips banks with the engine's parameters, ep_size 2 on their own
    one = run_ranks(_banks_run, str(tmp_path / "one"), 2, 1, off, tmp_path=tmp_path / "r1")[0]
    two = run_ranks(_banks_run, str(tmp_path / "two"), 2, 2, off, tmp_path=tmp_path / "r2")[0]
    assert _close(two["train_losses"], one["train_losses"], 1e-5), (two["train_losses"], one["train_losses"])
    a, b = _exported(tmp_path / "one"), _exported(tmp_path / "two")
    assert a.keys() == b.keys() and a["banks.0.memory"].shape == b["banks.0.memory"].shape == (16, 32)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ckpt = tmp_path / "two" / "checkpoints" / "step00000002"
    assert (ckpt / "chapter_banks_rank0.safetensors").is_file() and (ckpt / "chapter_banks_rank1.safetensors").is_file()
    resumed = run_ranks(_banks_run, str(tmp_path / "two"), 2, 2, (*off, f"training.resume_from_checkpoint={ckpt}"),
                        tmp_path=tmp_path / "r3")[0]
    assert _close(resumed["train_losses"], two["train_losses"][2:], 1e-6)
    c = _exported(tmp_path / "two")
    assert all(torch.equal(b[k], c[k]) for k in b)
    # the last checkpoint converts with whole banks from the ranks' shard files (megamem.hf)
    from megamem.hf.convert import read_source

    state, _, _ = read_source(str(tmp_path / "two" / "checkpoints"))
    assert state.keys() == c.keys() and all(torch.equal(state[k], c[k].float()) for k in c)


def test_sparse_bank_grad_trains_and_resumes(tmp_path):
    """Row-sparse banks through the trainer (ZeRO-1, clipped): resume is exact, and ep_size 2 (ZeRO-2) equals it."""
    sparse = ("memory.sparse_bank_grad=true", "memory.routing_strategy_train=sequence")
    full = run_ranks(_banks_run, str(tmp_path / "a"), 1, 1, sparse, tmp_path=tmp_path / "r1")[0]
    ckpt = tmp_path / "a" / "checkpoints" / "step00000002"
    resumed = run_ranks(_banks_run, str(tmp_path / "a"), 1, 1, (*sparse, f"training.resume_from_checkpoint={ckpt}"),
                        tmp_path=tmp_path / "r2")[0]
    assert _close(resumed["train_losses"], full["train_losses"][2:], 1e-6)
    two = run_ranks(_banks_run, str(tmp_path / "b"), 2, 2, sparse, tmp_path=tmp_path / "r3")[0]
    assert _close(two["train_losses"], full["train_losses"], 1e-5), (two["train_losses"], full["train_losses"])


def test_banks_outside_the_engine_refuse_zero0_and_zero3():
    from megamem.train.ds_config import resolve_ds_config

    for over in (("parallel.ep_size=2",), ("memory.sparse_bank_grad=true",)):
        cfg = tiny_config(*CHAPTERS, "training.mixed_precision=no", *over)
        resolve_ds_config(ZERO[2], cfg, 2)
        with pytest.raises(ConfigError, match="needs ZeRO stage 1 or 2"):
            resolve_ds_config(ZERO[0], cfg, 2)
    with pytest.raises(ConfigError, match="ZeRO stage 1 or 2"):
        resolve_ds_config(ZERO[3], tiny_config(*CHAPTERS, "parallel.ep_size=2"), 2)
    with pytest.raises(ConfigError, match="mixed_precision: no"):
        resolve_ds_config(ZERO[2], tiny_config(*CHAPTERS, "memory.sparse_bank_grad=true",
                                               "training.mixed_precision=bf16"), 2)


def _grad_norms(out, ds, extra=()):
    from megamem.train.trainer import Trainer

    cfg = make_cfg(out, "training.batch_size=2", "training.max_steps=3", "training.gradient_accumulation_steps=2",
                   "training.max_grad_norm=0.5", *extra)
    Trainer(cfg, ds, factory(61, 2, 16)).fit()
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [r["grad_norm"] for r in records if r["kind"] == "train"]


def test_grad_norm_reported_without_deepspeed_json(tmp_path):
    """ZeRO-0 in fp32 (the default without --deepspeed, single process, SLURM's default): DeepSpeed reports no
    norm, megamem measures it; it must equal the unclipped norm DeepSpeed's ZeRO-1 optimizer reports."""
    plain = run_ranks(_grad_norms, str(tmp_path / "a"), None, world_size=1, tmp_path=tmp_path / "r1")[0]
    zero1 = run_ranks(_grad_norms, str(tmp_path / "b"), ZERO[1], world_size=1, tmp_path=tmp_path / "r2")[0]
    assert None not in plain and len(plain) == 3
    assert max(plain) > 0.5  # above max_grad_norm: the reported norm is the one before clipping
    assert torch.allclose(torch.tensor(plain), torch.tensor(zero1), rtol=1e-5, atol=0)


def test_default_bf16_trains_like_fp32_on_two_ranks(tmp_path):
    """mixed_precision: bf16 (the default) through DeepSpeed ZeRO-3 on 2 ranks, against the same fp32 run.

    Tolerance: the engine keeps fp32 master weights; bf16 (8-bit mantissa, unit roundoff 2^-9 ≈ 2e-3)
    enters through the forward and backward, so the first losses (≈4.1) agree to a few 1e-3; later
    the two trajectories drift by the accumulated rounding of the updates (measured: first 3 steps
    within 4e-4, eval loss after 12 steps within 1.4e-3, while training moves it by ≈0.43 nat).
    Asserted with ~10× margin: first 3 steps within 4e-3, final eval within 0.02, learning > 0.3.
    """
    extra = ("training.max_steps=12", "training.learning_rate=0.01", "training.memory_lr=0.01")
    fp32 = run_ranks(_fit, str(tmp_path / "fp32"), ZERO[3], 2, (*extra, "training.mixed_precision=no"),
                     tmp_path=tmp_path / "r1")[0]
    bf16 = run_ranks(_fit, str(tmp_path / "bf16"), ZERO[3], 2, (*extra, "training.mixed_precision=bf16"),
                     tmp_path=tmp_path / "r2")[0]
    a, b = torch.tensor(fp32["train_losses"]), torch.tensor(bf16["train_losses"])
    assert not torch.equal(a, b)  # bf16 really ran
    assert (a[:3] - b[:3]).abs().max() <= 4e-3
    assert abs(fp32["eval"]["eval_loss"] - bf16["eval"]["eval_loss"]) <= 0.02
    assert a[0] - bf16["eval"]["eval_loss"] > 0.3  # both learn, by far more than the tolerance


def test_zero3_offload_json_trains_like_zero3(tmp_path):
    """ds_configs/zero3_offload.json (parameters and optimizer state offloaded to CPU, megamem's fused torch
    AdamW kept: zero_force_ds_cpu_optimizer false, no op compiled) trains to ZeRO-3's losses on 2 ranks."""
    offload = os.path.join(ROOT, "ds_configs", "zero3_offload.json")
    a = run_ranks(_fit, str(tmp_path / "off"), offload, 2, ("training.max_steps=3",), tmp_path=tmp_path / "r1")[0]
    b = run_ranks(_fit, str(tmp_path / "z3"), ZERO[3], 2, ("training.max_steps=3",), tmp_path=tmp_path / "r2")[0]
    assert _close(a["train_losses"], b["train_losses"], 1e-6) and a["eval"]["eval_loss"] == pytest.approx(
        b["eval"]["eval_loss"], abs=1e-6)
