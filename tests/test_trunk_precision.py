"""A progressive phase's frozen trunk held at bf16 / fp16 under an fp32 engine (training.quantization_type;
megamem.train.trunk_precision, docs/progressive.md). References are independent of the precision code: an fp32 run
of the same phase whose init_from export has the trunk's weights rounded to bf16 here, byte counts from the plain
model's shapes, and merged weights computed in float64 from the trained tensors."""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dist_utils import run_ranks
from synthetic_data import SyntheticLoader
from test_train import ZERO, make_cfg

PHASES = ("training.mode=fused", "training.block_size=1", "training.total_blocks=3", "model.num_layers=3",
          "memory.memory_layer_placement=all", "training.qlora_enabled=true", "training.qlora_rank=2",
          "training.qlora_alpha=4", "training.learning_rate=0.01", "training.memory_lr=0.02",
          "training.current_block_lr=0.05", "training.qlora_lr=0.03", "training.warmup_steps=0",
          "training.batch_size=2", "training.steps_per_phase=3")
# plain SGD: an update is linear in its gradient, so O(u) gradient differences stay O(u) (Adam's first steps are
# ≈ lr·sign(g): they turn a rounding-sized difference of a near-zero gradient into a full step)
SGD = ("training.optimizer=sgd", "training.learning_rate=0.2", "training.memory_lr=0.2",
       "training.current_block_lr=0.5", "training.qlora_lr=0.5")
HELD = ("training.quantization_enabled=true", "training.quantization_type=bf16")
NF4_TRUNK = ("training.quantization_enabled=true", "training.quantization_type=nf4")
FUSED_LORA = ("training.mode=fused", "training.block_size=2", "training.total_blocks=2", "training.qlora_enabled=true")


def _norm_names(model):
    """Parameters of the plain model's normalisation layers (held fp32: their kernels take the input's dtype)."""
    from megamem.model.layers import RMSNorm

    return {f"{m_name}.{n}" for m_name, m in model.named_modules() if isinstance(m, (RMSNorm, torch.nn.LayerNorm))
            for n, _ in m.named_parameters()}


def _model(cfg, seed=0):
    from megamem.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_trunk_is_held_at_half_the_bytes_and_only_the_trunk(tmp_path, name, dtype):
    from megamem.train.trainable import apply_training_policy

    cfg = make_cfg(str(tmp_path), *PHASES, "training.phase=2", "training.quantization_enabled=true",
                   f"training.quantization_type={name}")
    model = _model(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}  # the plain model's: the byte reference
    norms = _norm_names(model)
    counts = apply_training_policy(model, cfg, seed=0)
    trunk = {n for n in shapes if n.startswith(("blocks.0.", "blocks.1.")) and n not in norms}
    assert norms & {n for n in shapes if n.startswith("blocks.0.")}
    numel = sum(shapes[n].numel() for n in trunk)
    assert counts["trunk_parameters"] == numel
    assert counts["trunk_bytes_fp32"] == 4 * numel and counts["trunk_bytes"] == 2 * numel
    for n, p in model.named_parameters():
        plain = n.replace(".base_layer.", ".")
        if "lora_" in n:  # the adapters on the trunk: fp32, trained
            assert p.dtype == torch.float32 and p.requires_grad, n
        elif plain in trunk:
            assert p.dtype == dtype and not p.requires_grad, n
            assert p.untyped_storage().nbytes() == 2 * shapes[plain].numel(), n  # the storage itself is half
        else:  # the current block, embeddings, head, banks, the norms' weights (CPU layer_norm wants fp32 ones)
            assert p.dtype == torch.float32, n
    assert [b.compute_dtype for b in model.blocks] == [dtype, dtype, None]


def test_phase_0_has_no_trunk_to_hold(tmp_path):
    from megamem.train.trainable import apply_training_policy

    cfg = make_cfg(str(tmp_path), *PHASES, "training.phase=0", "model.num_layers=1", *HELD)
    model = _model(cfg)
    assert apply_training_policy(model, cfg, seed=0)["trunk_parameters"] == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.compute_dtype is None for b in model.blocks)


def _phase_1(out, held, rounded, stage=0, extra=()):
    """Phase 1 of PHASES through the real Trainer (ZeRO-0, fp32 engine) from a phase-0 export made here; the
    trunk held at bf16 (held), or an fp32 run whose export has blocks.0.* rounded to bf16 (rounded)."""
    from megamem.folders import export_model
    from megamem.train.progressive import phase_config
    from megamem.train.trainer import Trainer

    cfg = make_cfg(out, *PHASES, "training.steps_per_phase=4", *SGD, *(HELD if held else ()), *extra)
    first = phase_config(cfg, 0)
    state = _model(first, seed=3).state_dict()
    if rounded:
        state = {k: v.to(torch.bfloat16).float() if k.startswith("blocks.0.") and "norm" not in k else v
                 for k, v in state.items()}  # what the held run holds at bf16: the trunk but its norms
    export_model(state, first, None, os.path.join(first.training.output_dir, "final"), 1)
    phase = phase_config(cfg, 1)
    phase.training.init_data_from = None  # phase 0 is an export made here, not a run
    trainer = Trainer(phase, ZERO[stage], lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split))
    before = {n: q.detach().clone() for n, q in trainer.model.named_parameters()}
    result = trainer.fit()
    result.update(before=before, after={n: q.detach().clone() for n, q in trainer.model.named_parameters()},
                  export=load_file(os.path.join(phase.training.output_dir, "final", "model.safetensors")))
    return result


def test_a_bf16_trunk_trains_like_an_fp32_run_on_the_rounded_trunk(tmp_path):
    held = run_ranks(_phase_1, str(tmp_path / "held"), True, False, world_size=1, tmp_path=tmp_path / "r1")[0]
    ref = run_ranks(_phase_1, str(tmp_path / "ref"), False, True, world_size=1, tmp_path=tmp_path / "r2")[0]
    a, b = torch.tensor(held["train_losses"]), torch.tensor(ref["train_losses"])
    assert len(a) == 4
    # The weights are the same numbers; what differs is the rounding of activations inside the held trunk's matmuls
    # and attention (bf16's unit roundoff u = 2^-8 ≈ 3.9e-3): each trunk output moves by O(u) relative, the loss (a
    # mean over 32 tokens, after an identity-initialised block) by far less, and with SGD each update by O(u) of
    # itself. Measured: ≤ 4e-5 over the 4 steps; 2e-4 (5e-5 of the loss) leaves room for other CPUs' kernels,
    # while the loss falls by 0.2 over the steps. (Rounding the trunk's weights itself moves this loss by less than
    # that too: that the weights are the rounded ones is checked bitwise below.)
    assert (a - b).abs().max() <= 2e-4, (a, b)
    assert a[0] - a[-1] > 0.1
    trunk = [n for n in held["after"] if n.startswith("blocks.0.")]
    lora = [n for n in trunk if "lora_" in n]
    assert lora
    for n in trunk:
        if "lora_" in n:  # the adapters train, in fp32
            assert held["after"][n].dtype == torch.float32 and not torch.equal(held["before"][n], held["after"][n]), n
        else:  # the held trunk: bf16 (its norms fp32), bitwise unchanged, equal to the export rounded once
            assert held["after"][n].dtype == (torch.float32 if "norm" in n else torch.bfloat16), n
            assert torch.equal(held["before"][n], held["after"][n]), n
            assert torch.equal(held["after"][n].float(), ref["before"][n]), n
    # the export: fp32, no LoRA keys, W (the held bf16 values) + (α/r)·B·A in float64 from the trained tensors
    export = held["export"]
    assert all(v.dtype == torch.float32 for v in export.values())
    assert not any("lora_" in k or "base_layer" in k for k in export)
    for n in lora:
        if ".lora_A." not in n:
            continue
        module = n.split(".lora_A.")[0]
        after = held["after"]
        want = after[f"{module}.base_layer.weight"].double() + 4 / 2 * (
            after[f"{module}.lora_B.stack.weight"].double() @ after[f"{module}.lora_A.stack.weight"].double())
        assert (export[f"{module}.weight"].double() - want).abs().max() <= 1e-6, module


ADAMW = ("training.optimizer=adamw", "training.learning_rate=0.01", "training.memory_lr=0.01",
         "training.current_block_lr=0.01", "training.qlora_lr=0.01")


def _zero_phase(out, stage, batch):
    """Phase 1 with the trunk held at bf16 on a ZeRO layout; the trunk's stored dtypes and bytes on this rank."""
    from megamem.folders import export_model
    from megamem.train.progressive import phase_config
    from megamem.train.trainer import Trainer
    from synthetic_data import factory

    cfg = make_cfg(out, *PHASES, "training.steps_per_phase=3", *ADAMW, *HELD, f"training.batch_size={batch}")
    first = phase_config(cfg, 0)
    export_model(_model(first, seed=3).state_dict(), first, None, os.path.join(first.training.output_dir, "final"), 1)
    phase = phase_config(cfg, 1)
    phase.training.init_data_from = None
    trainer = Trainer(phase, ZERO[stage], factory(61, batch, 16))
    stored = {n: getattr(q, "ds_tensor", q) for n, q in trainer.model.named_parameters() if n.startswith("blocks.0.")}
    result = trainer.fit()
    result["dtypes"] = {n: t.dtype for n, t in stored.items()}
    held = [t for n, t in stored.items() if "lora_" not in n and "norm" not in n]
    result["bytes"] = sum(t.numel() * t.element_size() for t in held)
    result["elements"] = sum(t.numel() for t in held)
    return result


def test_zero2_and_zero3_hold_the_trunk_at_bf16_and_train_like_zero0(tmp_path):
    one = run_ranks(_zero_phase, str(tmp_path / "one"), 0, 4, world_size=1, tmp_path=tmp_path / "r1")[0]
    zero2 = run_ranks(_zero_phase, str(tmp_path / "z2"), 2, 4, world_size=1, tmp_path=tmp_path / "r3")[0]
    two = run_ranks(_zero_phase, str(tmp_path / "two"), 3, 2, world_size=2, tmp_path=tmp_path / "r2")
    assert zero2["bytes"] == one["bytes"] and torch.allclose(torch.tensor(zero2["train_losses"]),
                                                             torch.tensor(one["train_losses"]), atol=1e-5, rtol=0)
    for r in (one, zero2, *two):
        assert {d for n, d in r["dtypes"].items() if "lora_" not in n and "norm" not in n} == {torch.bfloat16}
        assert {d for n, d in r["dtypes"].items() if "lora_" in n or "norm" in n} == {torch.float32}
        assert r["bytes"] == 2 * r["elements"]
    assert sum(r["elements"] for r in two) >= one["elements"]  # each rank holds its (padded) share of the trunk
    assert max(r["elements"] for r in two) < one["elements"]
    a, b = torch.tensor(one["train_losses"]), torch.tensor(two[0]["train_losses"])
    assert len(a) == 3 and torch.allclose(a, b, atol=1e-4, rtol=0), (a, b)  # the same arithmetic, other layout


def preempted_schedule_like_the_unbroken(tmp_path, capsys, *overrides) -> str:
    """tools/progressive.py chaining three phases of PHASES + overrides (the real Trainer in process, as
    scripts/train.py runs it), once unbroken and once with phase 2 preempted mid-way and rerun: every phase's
    export bitwise the same, fp32, merged. Returns the unbroken run's folder."""
    from megamem.config import save_config
    from test_progressive import _tool
    from test_progressive_resume import _run_in_process

    tool = _tool()

    def config_file(out):
        path = str(tmp_path / f"{os.path.basename(out)}.yaml")
        save_config(make_cfg(out, *PHASES, *overrides, "training.steps_per_phase=3"), path)
        return path

    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    assert tool.main(["--config", config_file(whole)], run=_run_in_process()) == 0
    path = config_file(broken)
    assert tool.main(["--config", path], run=_run_in_process(preempt_at=(2, 2))) == 75  # phase 2: 2 trunk blocks
    assert "phase 2 was preempted" in capsys.readouterr().err
    assert tool.main(["--config", path], run=_run_in_process()) == 0
    for p in range(3):
        a = load_file(os.path.join(whole, f"phase_{p}", "final", "model.safetensors"))
        b = load_file(os.path.join(broken, f"phase_{p}", "final", "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), p
        assert all(v.dtype == torch.float32 for v in a.values()) and not any("lora_" in k for k in a)
    return whole


def test_phases_continue_and_a_preempted_held_phase_resumes_like_the_unbroken_schedule(tmp_path, capsys):
    """Each phase starts from the previous export (fp32, merged) and holds its trunk again."""
    whole = preempted_schedule_like_the_unbroken(tmp_path, capsys, *SGD, *HELD)
    for p in range(1, 3):
        a = load_file(os.path.join(whole, f"phase_{p}", "final", "model.safetensors"))
        # the trunk's frozen weights without adapters are the previous export's, rounded once
        prev = load_file(os.path.join(whole, f"phase_{p - 1}", "final", "model.safetensors"))
        kept = [k for k in a if k.startswith("blocks.0.") and torch.equal(a[k], prev[k])]
        assert kept and all(torch.equal(a[k], prev[k].to(torch.bfloat16).float()) for k in kept if "norm" not in k)


@pytest.mark.parametrize("overrides,message", [
    (("training.mixed_precision=no", *HELD), "training.quantization_type: bf16 holds a progressive phase's frozen "
                                             "trunk: set training.mode"),
    (("training.mixed_precision=no", "training.mode=fused", "training.block_size=2", "training.total_blocks=2",
      "training.fusion_mode=trainable", *HELD), "with fusion_mode: trainable the trunk trains at the engine's fp32"),
    (("training.mixed_precision=bf16", "training.quantization_enabled=true", "training.quantization_type=fp16"),
     "fp16 would hold the trunk apart from a training.mixed_precision: bf16 engine"),
    (("training.mixed_precision=bf16", "training.quantization_enabled=true", "training.quantization_type=fp32"),
     "needs training.mixed_precision: no, else set training.quantization_type: bf16"),
    # the 4-bit trunk (tests/test_trunk_4bit.py)
    ((*NF4_TRUNK,), "training.quantization_type: nf4 holds a progressive phase's frozen trunk: set training.mode"),
    (("training.mode=fused", "training.block_size=2", "training.total_blocks=2", "training.fusion_mode=trainable",
      *NF4_TRUNK), "nf4: with fusion_mode: trainable the trunk trains at the engine's bf16; a trunk held at nf4 "
                   "needs training.fusion_mode: frozen"),
    ((*FUSED_LORA, *NF4_TRUNK, "training.mixed_precision=fp8"),
     "nf4 cannot be combined with training.mixed_precision: fp8"),
    (("training.mode=fused", "training.block_size=2", "training.total_blocks=2", *NF4_TRUNK),
     "nf4 is a QLoRA trunk: it needs training.qlora_enabled: true"),
])
def test_refusals_name_their_key(overrides, message):
    from megamem.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_config(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_dry_run_reports_the_held_bytes(tmp_path):
    from megamem.cli import parameter_report

    report = parameter_report(make_cfg(str(tmp_path), *PHASES, "training.phase=2", *HELD))
    model = _model(make_cfg(str(tmp_path), *PHASES, "training.phase=2"))
    numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("blocks.0.", "blocks.1."))
                and n not in _norm_names(model))
    assert f"trunk held at bf16: {numel:,} frozen parameters" in report


def test_activation_checkpointing_recomputes_the_held_trunk_under_its_autocast(tmp_path):
    """gradient_checkpointing wraps each block's forward; the held trunk's recompute must run at its dtype again,
    or the saved and recomputed activations would differ. Reference: the same held model without it."""
    from megamem.parallel.checkpointing import set_activation_checkpointing
    from megamem.train.trainable import apply_training_policy

    cfg = make_cfg(str(tmp_path), *PHASES, "training.phase=2", *HELD)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        model = _model(cfg)
        set_activation_checkpointing(model, checkpointed)  # as the Trainer does: before the policy
        apply_training_policy(model, cfg, seed=0)
        for name, q in model.named_parameters():  # B ≠ 0, so the adapters act on the forward
            if ".lora_B." in name:
                with torch.no_grad():
                    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        model.train()(ids, labels=ids).loss.backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


@pytest.mark.parametrize("kind", [("model.use_rms_norm=false",), ("model.attention_type=mla", "model.num_kv_heads=null"),
                                  ("model.use_peer=true",),
                                  ("memory.use_chapters=true", "memory.num_chapters=4", "memory.tokens_per_chapter=4",
                                   "memory.top_k_chapters=2", "memory.routing_strategy_train=token")])
def test_every_block_kind_runs_held_like_fp32_on_its_rounded_weights(tmp_path, kind):
    """LayerNorm, MLA, PEER (embedding_bag) and token-routed chapters in a held trunk: the loss of an fp32 model
    loaded with the held model's (rounded) weights, and gradients for every trainable tensor."""
    from megamem.train.trainable import apply_training_policy

    models = []
    for held in (True, False):
        cfg = make_cfg(str(tmp_path), *PHASES, "training.phase=2", "memory.wo_init_zero=false", *kind,
                       *(HELD if held else ()))
        model = _model(cfg)
        apply_training_policy(model, cfg, seed=0)
        models.append(model)
    models[1].load_state_dict({k: v.float() for k, v in models[0].state_dict().items()})
    assert any(p.dtype == torch.bfloat16 for n, p in models[0].named_parameters() if ".mlp." in n or ".memory." in n)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    held, ref = models[0](ids, labels=ids).loss, models[1](ids, labels=ids).loss
    assert abs(held.item() - ref.item()) <= 1e-3  # one forward: activations rounded at u = 2^-8, the loss a mean
    held.backward()
    for n, p in models[0].named_parameters():
        assert (p.grad is not None and bool(torch.isfinite(p.grad).all())) == p.requires_grad, n


PEER_ALL = ("model.use_peer=true", "model.peer_layer_placement=all")  # every layer: growth keeps earlier ones


def _peer_phase(out):
    """Phase 1 of PHASES with PEER MLPs (BatchNorm on the query) through the real Trainer; buffers before/after."""
    from megamem.folders import export_model
    from megamem.train.progressive import phase_config
    from megamem.train.trainer import Trainer

    cfg = make_cfg(out, *PHASES, "training.steps_per_phase=3", *SGD, *PEER_ALL)
    first = phase_config(cfg, 0)
    export_model(_model(first, seed=3).state_dict(), first, None, os.path.join(first.training.output_dir, "final"), 1)
    phase = phase_config(cfg, 1)
    phase.training.init_data_from = None
    phase.training.init_from_new_init = "zeros"  # PEER has no down_proj to zero for an identity block
    trainer = Trainer(phase, ZERO[0], lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split))
    before = {n: b.detach().clone() for n, b in trainer.model.named_buffers() if "query_norm" in n}
    result = trainer.fit()
    result.update(before=before, after={n: b.detach().clone() for n, b in trainer.model.named_buffers()
                                        if "query_norm" in n})
    return result


def test_a_frozen_trunk_keeps_its_batch_norm_statistics(tmp_path):
    """PEER's query BatchNorm in a frozen trunk normalises with its running statistics and never updates them
    (as in eval); the trained block's BatchNorm keeps training mode and updates its own."""
    r = run_ranks(_peer_phase, str(tmp_path / "peer"), world_size=1, tmp_path=tmp_path / "r1")[0]
    trunk = [n for n in r["before"] if n.startswith("blocks.0.")]
    assert trunk and len(r["train_losses"]) == 3
    assert all(torch.equal(r["before"][n], r["after"][n]) for n in trunk)  # num_batches_tracked included
    counted = "blocks.1.mlp.query_norm.num_batches_tracked"  # the trained block: one update a training step
    assert r["after"][counted] == r["before"][counted] + 3
    var = "blocks.1.mlp.query_norm.running_var"
    assert not torch.equal(r["before"][var], r["after"][var])


def test_frozen_batch_norm_normalises_with_its_running_statistics(tmp_path):
    from megamem.train.trainable import apply_training_policy

    cfg = make_cfg(str(tmp_path), *PHASES, "training.phase=2", *PEER_ALL)
    model = _model(cfg)
    apply_training_policy(model, cfg, seed=0)
    model.train()
    norm = model.blocks[0].mlp.query_norm
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, norm.num_features)
    want = (x - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    stats = norm.running_mean.clone()
    assert (norm(x) - want).abs().max() < 1e-5 and torch.equal(norm.running_mean, stats)
    trained = model.blocks[2].mlp.query_norm
    y = trained(x)  # the current block's norm: batch statistics (training mode)
    assert (y.mean(0)).abs().max() < 1e-5 and not torch.equal(trained.running_mean, torch.zeros_like(stats))
