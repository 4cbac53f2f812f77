"""LoRA on a progressive phase's frozen trunk (training.qlora_enabled, training.progressive.*; docs/progressive.md).
References are independent of megamem's LoRA code: rank/alpha values written out by hand from the formulas, the
trunk's linear layers listed from a plain model, merged weights computed in float64 from the adapters' own
tensors, and a plain model holding those weights as the logits reference."""
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import tiny_config
from dist_utils import run_ranks
from synthetic_data import SyntheticLoader
from test_train import ZERO, _preempt_during, make_cfg

DUAL = ("training.mode=fused", "training.block_size=1", "training.total_blocks=3", "model.num_layers=3",
        "training.qlora_enabled=true", "training.progressive.qlora_strategy=progressive",
        "training.progressive.qlora_rank_pattern=increasing", "training.progressive.qlora_alpha_pattern=linear",
        "training.qlora_rank=2", "training.qlora_alpha=4", "training.progressive.progressive_qlora=true",
        "training.progressive.progressive_qlora_rank=3", "training.progressive.progressive_qlora_alpha=5",
        "training.learning_rate=0.01", "training.memory_lr=0.02", "training.current_block_lr=0.05",
        "training.qlora_lr=0.03", "training.warmup_steps=0", "training.batch_size=2", "training.steps_per_phase=3",
        "memory.memory_layer_placement=all")
IDS = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))


def test_rank_and_alpha_patterns_equal_the_formulas():
    from megamem.config.trunk_lora import stack_rank_alpha

    def values(*extra):
        t = tiny_config("model.num_layers=6", "training.mode=fused", "training.block_size=1",
                        "training.total_blocks=6", "training.qlora_enabled=true", "training.qlora_rank=16",
                        "training.qlora_alpha=32", *extra).training
        return [stack_rank_alpha(t, k) for k in range(6)]

    prog = ("training.progressive.qlora_strategy=progressive",)
    ranks = lambda pattern: [r for r, _ in values(*prog, f"training.progressive.qlora_rank_pattern={pattern}")]  # noqa: E731
    alphas = lambda pattern: [a for _, a in values(*prog,  # noqa: E731
                                                    f"training.progressive.qlora_alpha_pattern={pattern}")]
    assert ranks("constant") == [16] * 6
    assert ranks("increasing") == [16, 32, 64, 128, 256, 512]  # r·2^k
    assert ranks("decreasing") == [16, 8, 4, 2, 1, 1]  # max(1, r // 2^k)
    assert ranks("linear") == [16, 24, 32, 40, 48, 56]  # r + 8k
    assert alphas("constant") == [32] * 6
    assert alphas("increasing") == [32, 64, 128, 256, 512, 1024]  # α·2^k
    assert alphas("linear") == [32, 48, 64, 80, 96, 112]  # α + 16k
    assert values() == [(16, 32)] * 6  # simplified
    variable = values("training.progressive.qlora_strategy=variable",
                      "training.progressive.qlora_configs=[{stack: 0, rank: 8, alpha: 16}, {stack: 2, rank: 64, "
                      "alpha: 128}]")
    assert variable == [(8, 16), (16, 32), (64, 128), (16, 32), (16, 32), (16, 32)]  # fallback (r, α)
    from megamem.config import ConfigError

    assert alphas("decreasing") == [32, 16, 8, 4, 2, 1]  # α // 2^k
    with pytest.raises(ConfigError, match=r"stack 4's LoRA would have rank 16, alpha 0"):  # 8 // 2^4 = 0
        values(*prog, "training.progressive.qlora_alpha_pattern=decreasing", "training.qlora_alpha=8")


def _trunk_linears(cfg, upto):
    """Names of the plain model's non-memory Linear modules in blocks < upto (the reference for what adapts)."""
    from megamem.model import build_model

    model = build_model(cfg)
    memory = {id(p) for p in model.memory_parameters()}
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(tuple(
        f"blocks.{i}." for i in range(upto))) and not any(id(p) in memory for p in m.parameters())}


def _phases(out, extra):
    """Every phase through the real Trainer, in this process; per phase its weights before and after, the groups
    {name: (lr, weight_decay, names)}, the trained module and the final export."""
    from megamem.train.progressive import phase_config
    from megamem.train.trainer import Trainer

    cfg, results = make_cfg(out, *DUAL, *extra), []
    for p in range(cfg.training.total_blocks):
        phase = phase_config(cfg, p)
        trainer = Trainer(phase, ZERO[0], lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split))
        before = {n: q.detach().clone() for n, q in trainer.model.named_parameters()}
        trainer.fit()
        with torch.no_grad():
            logits = trainer.model.eval()(IDS).logits
        results.append({"before": before, "after": {n: q.detach().clone() for n, q in trainer.model.named_parameters()},
                        "groups": {g["name"]: (g["lr"], g["weight_decay"], set(g["param_names"]))
                                   for g in trainer.groups},
                        "trainable": {n for n, q in trainer.model.named_parameters() if q.requires_grad},
                        "linears": _trunk_linears(phase, p), "logits": logits, "cfg": phase,
                        "export": load_file(os.path.join(phase.training.output_dir, "final", "model.safetensors"))})
    return results


def test_dual_lora_trains_only_the_adapters_on_the_trunk_and_exports_merged(tmp_path):
    results = run_ranks(_phases, str(tmp_path / "run"), (), world_size=1, tmp_path=tmp_path / "r")[0]
    assert not any("lora_" in n for n in results[0]["after"])  # phase 0 has no trunk
    for p, r in enumerate(results[1:], start=1):
        lora = {n for n in r["after"] if "lora_" in n}
        expected = {f"{m}.lora_{ab}.{adapter}.weight" for m in r["linears"] for ab in "AB"
                    for adapter in ("stack", "progressive")}
        assert lora == expected and expected
        for name in lora:  # stack k: rank 2·2^k (increasing); progressive: rank 3
            k = int(name.split(".")[1])
            rank = 3 if ".progressive." in name else 2 * 2 ** k
            assert (r["after"][name].shape[0] if ".lora_A." in name else r["after"][name].shape[1]) == rank, name
        groups = r["groups"]
        assert groups["trunk_lora"] == (0.03, 0.0, lora)  # exactly the adapters, at qlora_lr, no decay
        assert groups["current_block"][0] == 0.05
        assert groups["current_block"][2] | groups["current_block_no_decay"][2] == \
            {n for n in r["after"] if n.startswith(f"blocks.{p}.")}
        in_groups = {n for _, _, names in groups.values() for n in names}
        assert in_groups == r["trainable"]  # the groups hold exactly the tensors that train, each at its rate:
        assert sum(len(names) for _, _, names in groups.values()) == len(in_groups)
        assert {name: lr for name, (lr, _, _) in groups.items()} == {
            "trunk_lora": 0.03, "current_block": 0.05, "current_block_no_decay": 0.05, "base": 0.01,
            "base_no_decay": 0.01, "memory_no_decay": 0.02}
        assert groups["base"][2] | groups["base_no_decay"][2] == {"tok_embeddings.weight", "norm.weight",
                                                                  "lm_head.weight"}
        trunk = {n for n in r["after"] if n.startswith(tuple(f"blocks.{i}." for i in range(p)))}
        assert trunk & in_groups == lora
        for name in trunk - lora:  # the frozen trunk: bitwise the previous phase's export
            plain = name.replace(".base_layer.", ".")
            assert torch.equal(r["before"][name], r["after"][name]), name
            assert torch.equal(r["after"][name], results[p - 1]["export"][plain]), name
        for name in lora:  # every adapter trained: B left zero, A moved
            assert not torch.equal(r["before"][name], r["after"][name]), name
            if ".lora_B." in name:
                assert torch.count_nonzero(r["before"][name]) == 0
        _check_export(r, p)


def _check_export(r, p):
    """The export: no LoRA keys, W + Σ (α/r)·B·A (float64 from the adapters' tensors), the adapter forward's
    logits."""
    from megamem.model import build_model

    export, after = r["export"], r["after"]
    assert not any("lora_" in k or "base_layer" in k for k in export)
    for module in r["linears"]:
        k = int(module.split(".")[1])
        want = after[f"{module}.base_layer.weight"].double()
        for adapter, (rank, alpha) in (("stack", (2 * 2 ** k, 4 + 16 * k)), ("progressive", (3, 5))):
            b = after[f"{module}.lora_B.{adapter}.weight"].double()
            a = after[f"{module}.lora_A.{adapter}.weight"].double()
            want = want + alpha / rank * (b @ a)
        assert torch.allclose(export[f"{module}.weight"].double(), want, atol=1e-6, rtol=0), module
    plain = build_model(r["cfg"]).eval()
    plain.load_state_dict(export)
    with torch.no_grad():
        merged = plain(IDS).logits
    assert (r["logits"] - merged).abs().max() <= 1e-5, p  # the trained adapter model's forward


def test_lora_at_init_is_the_identity_and_adapters_equal_their_merged_weights(tmp_path):
    from megamem.model import build_model
    from megamem.train.trainable import apply_training_policy

    cfg = make_cfg(str(tmp_path / "run"), *DUAL, "training.phase=2")  # phase 2's model, without its init_from
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    plain = build_model(cfg).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = plain(ids).logits
        counts = apply_training_policy(model, cfg, seed=5)
        assert counts["lora"] > 0
        assert (model(ids).logits - reference).abs().max() <= 1e-6  # B = 0: the identity
        gen, merged = torch.Generator().manual_seed(2), {}
        for name, q in model.named_parameters():
            if ".lora_B." in name:
                q.copy_(torch.randn(q.shape, generator=gen) * 0.05)
        params = dict(model.named_parameters())
        for module in _trunk_linears(cfg, 2):  # the reference merge, written out here
            k = int(module.split(".")[1])
            w = params[f"{module}.base_layer.weight"].double()
            for adapter, (rank, alpha) in (("stack", (2 * 2 ** k, 4 + 16 * k)), ("progressive", (3, 5))):
                w = w + alpha / rank * (params[f"{module}.lora_B.{adapter}.weight"].double()
                                        @ params[f"{module}.lora_A.{adapter}.weight"].double())
            merged[f"{module}.weight"] = w.float()
        state = plain.state_dict()
        state.update(merged)
        plain.load_state_dict(state)
        adapted = model(ids).logits
        assert (adapted - reference).abs().max() > 1e-3  # the adapters do act
        assert (adapted - plain(ids).logits).abs().max() <= 1e-5


def _resumable_phase(out, stop_after, resume):
    """Phase 1 of DUAL (init_from a phase-0 export made here), 4 steps, optionally preempted after stop_after."""
    from megamem.folders import export_model
    from megamem.model import build_model
    from megamem.train.progressive import phase_config
    from megamem.train.trainer import Trainer

    cfg = make_cfg(out, *DUAL, "training.steps_per_phase=4", "training.save_steps=1000")
    first = phase_config(cfg, 0)
    final = os.path.join(first.training.output_dir, "final")
    if not os.path.isdir(final):
        torch.manual_seed(3)
        export_model(build_model(first).state_dict(), first, None, final, 1)
    phase = phase_config(cfg, 1, resume=resume)
    phase.training.init_data_from = None  # phase 0 is an export made here, not a run: no data position to read on
    if stop_after is not None:
        _preempt_during(stop_after)
    trainer = Trainer(phase, ZERO[1], lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split))
    result = trainer.fit()
    result["lora"] = {n: q.detach().clone() for n, q in trainer.model.named_parameters() if "lora_" in n}
    if result["preempted"]:  # the checkpoint as tools/convert_to_hf.py and init_from read it: merged, as written here
        from megamem.parallel.weights import read_weights

        state, _, _ = read_weights(os.path.join(phase.training.output_dir, "checkpoints"), "--checkpoint")
        params = dict(trainer.model.named_parameters())
        result["read_keys"] = set(state)
        result["merge_error"] = 0.0
        for module in _trunk_linears(phase, 1):
            w = params[f"{module}.base_layer.weight"].double()
            for adapter, (rank, alpha) in (("stack", (2, 4)), ("progressive", (3, 5))):  # stack 0: r, α
                w = w + alpha / rank * (params[f"{module}.lora_B.{adapter}.weight"].double()
                                        @ params[f"{module}.lora_A.{adapter}.weight"].double())
            error = (state[f"{module}.weight"].double() - w).abs().max().item()
            result["merge_error"] = max(result["merge_error"], error)
    return result


def test_resume_mid_phase_restores_the_adapters_exactly(tmp_path):
    full = run_ranks(_resumable_phase, str(tmp_path / "a"), None, False, world_size=1, tmp_path=tmp_path / "r1")[0]
    first = run_ranks(_resumable_phase, str(tmp_path / "b"), 2, False, world_size=1, tmp_path=tmp_path / "r2")[0]
    assert first["preempted"] and first["steps"] == 2
    assert not any("lora_" in k or "base_layer" in k for k in first["read_keys"]) and first["merge_error"] <= 1e-6
    resumed = run_ranks(_resumable_phase, str(tmp_path / "b"), None, True, world_size=1, tmp_path=tmp_path / "r3")[0]
    assert resumed["steps"] == 4 and len(resumed["train_losses"]) == 2
    assert torch.allclose(torch.tensor(resumed["train_losses"]), torch.tensor(full["train_losses"][2:]), atol=1e-6,
                          rtol=0)
    assert full["lora"].keys() == resumed["lora"].keys() and full["lora"]
    for name, value in full["lora"].items():
        assert torch.allclose(resumed["lora"][name], value, atol=1e-6, rtol=0), name


FUSED = ("training.mode=fused", "training.block_size=2", "training.total_blocks=2")
ON = (*FUSED, "training.qlora_enabled=true")


@pytest.mark.parametrize("overrides,message", [
    (("training.qlora_rank=8",), "training.qlora_rank is read only with LoRA on the trunk"),
    ((*FUSED, "training.progressive.progressive_qlora=true"),
     "training.progressive.progressive_qlora is read only with LoRA on the trunk"),
    (("training.qlora_enabled=true",), "training.qlora_enabled puts LoRA on a progressive phase's frozen trunk"),
    ((*ON, "training.fusion_mode=trainable"), "LoRA on the trunk needs training.fusion_mode: frozen"),
    ((*ON, "memory.use_lora=true", "memory.use_both_memory_and_lora=true"),
     "training.qlora_enabled and memory.use_lora both put LoRA on the blocks"),
    ((*FUSED, "training.qlora_enabled=false", "training.progressive.trunk_strategy=qlora"),
     "training.qlora_enabled: false contradicts training.progressive.trunk_strategy: qlora"),
    (("training.mode=blockwise", "training.block_size=2", "training.total_blocks=2",
      "training.progressive.enabled=true"),
     "training.progressive.enabled grows the model one stack per phase: set training.mode: fused (it is blockwise)"),
    (("training.mode=blockwise", "training.block_size=2", "training.total_blocks=2", "training.qlora_enabled=true",
      "training.progressive.progressive_qlora=true"), "progressive_qlora adds LoRA when a stack is appended"),
    ((*ON, "training.progressive.qlora_strategy=variable"), "qlora_strategy: variable needs qlora_configs"),
    ((*ON, "training.progressive.qlora_configs=[{stack: 0, rank: 4, alpha: 8}]"),
     "qlora_configs is read only with qlora_strategy: variable (it is simplified)"),
    ((*ON, "training.progressive.qlora_rank_pattern=linear"),
     "qlora_rank_pattern is read only with qlora_strategy: progressive"),
    ((*ON, "training.progressive.qlora_strategy=variable", "training.progressive.qlora_configs=[{stack: 2, rank: 4}]"),
     "qlora_configs: stack 2 is not a stack (0 … 1)"),
    ((*ON, "training.progressive.qlora_strategy=variable",
      "training.progressive.qlora_configs=[{stack: 0}, {stack: 0}]"), "qlora_configs: stack 0 is given twice"),
    ((*ON, "training.qlora_rank=0"), "training.qlora_rank must be > 0, got 0"),
    ((*ON, "training.progressive.progressive_qlora_alpha=-1"), "progressive_qlora_alpha must be > 0, got -1"),
    ((*ON, "training.qlora_lr=0"), "training.qlora_lr must be > 0"),
    (("training.progressive.new_stack_precision=nvfp4",), "new_stack_precision: nvfp4 needs Blackwell GPUs"),
    (("training.mixed_precision=no", "training.progressive.new_stack_precision=bfloat16"),
     "new_stack_precision: bfloat16 means training.mixed_precision: bf16"),
    (("training.quantization_type=fp16",), "training.quantization_type: fp16 is read only with "
                                           "training.quantization_enabled: true"),
    (("training.quantization_enabled=true",), "training.quantization_enabled needs training.quantization_type"),
    (("training.quantization_enabled=true", "training.quantization_type=nvfp4"), "nvfp4 needs Blackwell GPUs"),
    (("training.quantization_enabled=true", "training.quantization_type=fp8"), "fp8 is not a trunk storage"),
    (("training.mixed_precision=bf16", "training.quantization_enabled=true", "training.quantization_type=fp32"),
     "fp32 would hold the trunk apart from a training.mixed_precision: bf16 engine"),
])
def test_refusals_name_their_key(overrides, message):
    from megamem.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_config(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_accepted_precisions_name_the_engines():
    for precision, stack in (("no", "full"), ("bf16", "bfloat16")):
        cfg = tiny_config(*ON, f"training.mixed_precision={precision}", "training.quantization_enabled=true",
                          f"training.quantization_type={'fp32' if precision == 'no' else 'bf16'}",
                          f"training.progressive.new_stack_precision={stack}")
        assert cfg.training.quantization_enabled
