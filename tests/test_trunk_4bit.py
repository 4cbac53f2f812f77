"""A progressive phase's frozen trunk stored in 4 bits (training.quantization_type: nf4 | fp4; QLoRA through
bitsandbytes; megamem.adapter.four_bit, megamem.train.trunk_precision, docs/progressive.md).

megamem refuses 4-bit trunks off CUDA; these tests run the same code on bitsandbytes' CPU kernels with the device
check told it is on CUDA. References are independent of the code under test: a float64 dequantizer written here
from the saved tensors, NF4's code from its construction (normal quantiles, QLoRA's appendix), nearest-code
rounding of the original weights, an fp32 run whose trunk holds the dequantized weights, merged weights in float64.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dist_utils import run_ranks
from synthetic_data import SyntheticLoader
from test_train import ZERO, make_cfg
from test_trunk_precision import FUSED_LORA as ON, NF4_TRUNK as NF4, PHASES, SGD, _model
from test_trunk_precision import preempted_schedule_like_the_unbroken

# every linear layer's input width a multiple of bitsandbytes' 64-value block: its CPU kernels (0.50) compute wrong
# products otherwise (megamem refuses 4-bit trunks off CUDA; these tests run them there)
WIDE = ("model.hidden_dim=64", "model.intermediate_dim=128")


def _on_cuda(monkeypatch=None):
    """The device check as on a CUDA machine (the 4-bit path itself runs on bitsandbytes' CPU kernels)."""
    import megamem.config.trunk_lora as trunk_lora

    original = trunk_lora.precision_problem
    if monkeypatch is not None:
        monkeypatch.setattr(trunk_lora, "precision_problem", lambda cfg, on_cuda: original(cfg, True))
    else:
        trunk_lora.precision_problem = lambda cfg, on_cuda: original(cfg, True)


def nf4_code() -> torch.Tensor:
    """NF4 from its definition: 8 positive and 7 negative quantiles of N(0, 1) (the outermost at 0.9677083),
    zero, normalised to [-1, 1]."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return values / values.abs().max()


def dequantized(model):
    """{packed weight's name: its float64 value} by bitsandbytes' own dequantization of each live layer (right on
    its CPU kernels when a layer's input width is a multiple of 64, hence WIDE)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    return {f"{n}.weight": dequantize_4bit(m.weight.data, m.weight.quant_state).double()
            for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _phase_cfg(out, *extra, phase=2):
    return make_cfg(out, *PHASES, *WIDE, f"training.phase={phase}", *extra)


def _held(cfg, seed=0):
    from megamem.train.trainable import apply_training_policy

    model = _model(cfg, seed)
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    counts = apply_training_policy(model, cfg, seed=0)
    return model, plain, counts


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_trunk_base_layers_are_stored_in_4_bits_rounded_to_the_nearest_code(tmp_path, quant_type, monkeypatch):
    import sys

    from megamem.adapter.four_bit import dequantize_state

    cfg = _phase_cfg(str(tmp_path), "training.quantization_enabled=true", f"training.quantization_type={quant_type}")
    model, plain, counts = _held(cfg)
    state = model.state_dict()
    packed = sorted(k.split(".quant_state.")[0] for k in state if ".quant_state." in k)
    # every linear layer of blocks 0 and 1 outside the memory branch, and nothing else
    want = sorted(f"{n[:-len('.weight')]}.base_layer.weight" for n in plain if n.startswith(("blocks.0.", "blocks.1."))
                  and n.endswith("_proj.weight") and ".memory." not in n)
    assert packed == want and len(want) == 8
    numel = sum(plain[n.replace(".base_layer", "")].numel() for n in packed)
    assert counts["trunk_parameters"] == numel and counts["trunk_bytes_fp32"] == 4 * numel
    stats = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(tuple(p + "." for p in packed)))
    assert counts["trunk_bytes"] == numel // 2 + stats < numel  # half a byte a weight, plus the quant state
    reference = dequantized(model)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the reader needs no bitsandbytes
    read = dequantize_state(state)
    assert not any(".quant_state." in k or k.endswith(".absmax") for k in read)
    for name in packed:
        original = plain[name.replace(".base_layer", "")].double()
        assert state[name].dtype == torch.uint8 and state[name].numel() == original.numel() // 2
        assert read[name].dtype == torch.float32 and (read[name].double() - reference[name]).abs().max() < 1e-6, name
        code = state[f"{name}.quant_map"].double()
        if quant_type == "nf4":
            assert (code - nf4_code()).abs().max() < 1e-6
        assert len(code) == 16 and code.abs().max() == 1
        # each weight is the code nearest to it over its block's absmax (away from near-ties between two codes; the
        # stored absmax is itself rounded, by double quantization)
        blocks = original.flatten().reshape(-1, 64)
        absmax = blocks.abs().max(1, keepdim=True).values
        distance = (blocks[..., None] / absmax[..., None] - code).abs()
        two = distance.topk(2, largest=False).values
        clear = (two[..., 1] - two[..., 0]) > 5e-3
        chosen = (reference[name].flatten().reshape(-1, 64)[..., None] / absmax[..., None] - code).abs().argmin(-1)
        assert clear.float().mean() > 0.8 and torch.equal(chosen[clear], distance.argmin(-1)[clear]), name
        assert (reference[name] - original).abs().max() <= 0.5 * code.diff().max() * absmax.max() * 1.01
    for n, p in model.named_parameters():  # the adapters and everything outside the packed layers: fp32
        assert p.dtype == (torch.uint8 if n in packed else torch.float32), n


def test_the_4bit_trunk_computes_like_fp32_layers_holding_its_dequantized_weights(tmp_path):
    """Forward and the adapters' gradients (fp32 engine: the layers compute in fp32) against the same model without
    quantization whose trunk weights are set to the float64 dequantization, adapters moved off zero alike."""
    held, _, _ = _held(_phase_cfg(str(tmp_path), *NF4))
    ref, _, _ = _held(_phase_cfg(str(tmp_path)))
    reference = dequantized(held)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in reference:
                p.copy_(reference[name])
        torch.manual_seed(5)
        for (name, a), (_, b) in zip(held.named_parameters(), ref.named_parameters()):
            if "lora_B" in name:
                a.copy_(torch.randn_like(a) * 0.1)
                b.copy_(a)
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    out_a, out_b = held(tokens, labels=tokens), ref(tokens, labels=tokens)
    assert (out_a["logits"] - out_b["logits"]).abs().max() < 1e-5
    out_a["loss"].backward()
    out_b["loss"].backward()
    grads = [(n, a.grad, b.grad) for (n, a), (_, b) in zip(held.named_parameters(), ref.named_parameters())
             if "lora_" in n]
    assert len(grads) == 16 and all(g is not None and g.abs().max() > 0 for _, g, _ in grads)
    for n, a, b in grads:
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-8, n


def _phase_1(out, four_bit, trunk=None, stage=0, extra=()):
    """Phase 1 of PHASES through the real Trainer from a phase-0 export made here (its blocks.0 weights replaced by
    `trunk` when given); the trunk in 4 bits (four_bit) or fp32."""
    from megamem.folders import export_model
    from megamem.train.progressive import phase_config
    from megamem.train.trainer import Trainer

    _on_cuda()
    cfg = make_cfg(out, *PHASES, *WIDE, "training.steps_per_phase=4", *SGD, *(NF4 if four_bit else ()), *extra)
    first = phase_config(cfg, 0)
    state = _model(first, seed=3).state_dict()
    state.update(trunk or {})
    export_model(state, first, None, os.path.join(first.training.output_dir, "final"), 1)
    phase = phase_config(cfg, 1)
    phase.training.init_data_from = None
    trainer = Trainer(phase, ZERO[stage], lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split))
    saved = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trunk = {k: v.float() for k, v in dequantized(trainer.model).items()}
    result = trainer.fit()
    from megamem.parallel.weights import read_weights

    result.update(before=saved, trunk=trunk, after={k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                  export=load_file(os.path.join(phase.training.output_dir, "final", "model.safetensors")),
                  checkpoint=read_weights(os.path.join(phase.training.output_dir, "checkpoints"), "test")[0])
    return result


def test_a_4bit_phase_trains_like_fp32_on_its_dequantized_trunk_and_exports_merged_weights(tmp_path):
    held = run_ranks(_phase_1, str(tmp_path / "held"), True, world_size=1, tmp_path=tmp_path / "r1")[0]
    packed = sorted(k for k, v in held["before"].items() if v.dtype == torch.uint8 and k.endswith("base_layer.weight"))
    assert len(packed) == 4 and all(k.startswith("blocks.0.") for k in packed)
    trunk = {k.replace(".base_layer", ""): v for k, v in held["trunk"].items()}
    ref = run_ranks(_phase_1, str(tmp_path / "ref"), False, trunk, world_size=1, tmp_path=tmp_path / "r2")[0]
    a, b = torch.tensor(held["train_losses"]), torch.tensor(ref["train_losses"])
    assert len(a) == 4 and a[0] - a[-1] > 0.1
    assert (a - b).abs().max() <= 1e-5, (a, b)  # the same fp32 arithmetic on the same numbers
    # the packed trunk and its quant state are bitwise unchanged; the adapters and the new block trained
    quant = [k for k in held["before"] if k.startswith(tuple(p + "." for p in packed))]
    assert quant and all(torch.equal(held["before"][k], held["after"][k]) for k in packed + quant)
    lora = [k for k in held["after"] if "lora_" in k]
    assert lora and all(not torch.equal(held["before"][k], held["after"][k]) for k in lora)
    assert not torch.equal(held["before"]["blocks.1.attn.o_proj.weight"], held["after"]["blocks.1.attn.o_proj.weight"])
    # the export (and the checkpoint, read as training.init_from reads it): W dequantized + (α/r)·B·A, float64 here
    for source in (held["export"], held["checkpoint"]):
        assert not any("lora_" in k or "base_layer" in k or "quant" in k for k in source)
        assert all(v.dtype == torch.float32 for v in source.values())
        for name in packed:
            module = name[:-len(".base_layer.weight")]
            after = held["after"]
            want = trunk[f"{module}.weight"].double() + 4 / 2 * (
                after[f"{module}.lora_B.stack.weight"].double() @ after[f"{module}.lora_A.stack.weight"].double())
            assert (source[f"{module}.weight"].double() - want).abs().max() <= 1e-6, module
    assert all(torch.equal(held["export"][k], ref["export"][k]) for k in held["export"] if k.startswith("blocks.1."))


def test_zero2_trains_the_4bit_phase_like_zero0_and_its_checkpoint_reads_back(tmp_path):
    zero0 = run_ranks(_phase_1, str(tmp_path / "z0"), True, None, 0, world_size=1, tmp_path=tmp_path / "r1")[0]
    zero2 = run_ranks(_phase_1, str(tmp_path / "z2"), True, None, 2, world_size=1, tmp_path=tmp_path / "r2")[0]
    assert torch.allclose(torch.tensor(zero2["train_losses"]), torch.tensor(zero0["train_losses"]), atol=1e-6, rtol=0)
    assert zero2["checkpoint"].keys() == zero0["export"].keys()
    for k, v in zero0["export"].items():
        assert (zero2["checkpoint"][k] - v).abs().max() <= 1e-6, k


def test_a_bf16_engine_computes_the_4bit_trunk_in_bf16(tmp_path):
    """mixed_precision: bf16 (DeepSpeed's bf16 engine, fp32 master weights): the 4-bit layers dequantize to and
    multiply in bf16; the run follows the fp32 engine's within bf16's rounding and trains the adapters."""
    fp32 = run_ranks(_phase_1, str(tmp_path / "fp32"), True, world_size=1, tmp_path=tmp_path / "r1")[0]
    bf16 = run_ranks(_phase_1, str(tmp_path / "bf16"), True, None, 1, ("training.mixed_precision=bf16",),
                     world_size=1, tmp_path=tmp_path / "r2")[0]
    a, b = torch.tensor(bf16["train_losses"]), torch.tensor(fp32["train_losses"])
    assert len(a) == 4 and (a - b).abs().max() <= 3e-2 and not torch.equal(a, b), (a, b)
    packed = [k for k in bf16["before"] if k.endswith("base_layer.weight")]
    assert packed and all(torch.equal(bf16["before"][k], bf16["after"][k]) for k in packed)
    lora = [k for k in bf16["after"] if "lora_" in k]
    assert lora and all(not torch.equal(bf16["before"][k], bf16["after"][k]) for k in lora)


def test_a_saved_4bit_state_loads_into_a_model_quantized_from_other_weights(tmp_path):
    """load_state_dict (a DeepSpeed resume) takes the packed weights and their quant state, strictly."""
    a, _, _ = _held(_phase_cfg(str(tmp_path), *NF4), seed=0)
    b, _, _ = _held(_phase_cfg(str(tmp_path), *NF4), seed=1)
    assert any(not torch.equal(v, dequantized(b)[k]) for k, v in dequantized(a).items())
    b.load_state_dict(a.state_dict(), strict=True)
    assert all(torch.equal(v, dequantized(b)[k]) for k, v in dequantized(a).items())
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(tokens)["logits"], b(tokens)["logits"])


def test_phases_continue_and_a_preempted_4bit_phase_resumes_like_the_unbroken_schedule(tmp_path, capsys, monkeypatch):
    _on_cuda(monkeypatch)
    whole = preempted_schedule_like_the_unbroken(tmp_path, capsys, *WIDE, *SGD, *NF4)
    # phase 2 moved blocks 0 and 1 off phase 1's export: by its 4-bit rounding and its adapters' updates
    one, two = (load_file(os.path.join(whole, f"phase_{p}", "final", "model.safetensors")) for p in (1, 2))
    assert not torch.equal(one["blocks.1.mlp.down_proj.weight"], two["blocks.1.mlp.down_proj.weight"])


def test_the_device_check_refuses_cpu_a_missing_bitsandbytes_zero3_and_pipelines(monkeypatch):
    import importlib.util

    from megamem.config.trunk_lora import precision_problem
    from megamem.train.ds_config import layout_problems

    cfg = tiny_config(*ON, *NF4)
    assert "on CPU training.qlora_enabled / trunk_strategy: qlora means LoRA on a full-precision frozen trunk: set " \
           "training.quantization_enabled: false" in precision_problem(cfg, on_cuda=False)
    assert precision_problem(cfg, on_cuda=True) is None
    assert precision_problem(tiny_config(*ON), on_cuda=False) is None
    for ds in ({"zero_optimization": {"stage": 3}}, {"pipeline": {"stages": 2}}):
        (problem,) = [p for p in layout_problems(cfg, ds, on_cuda=True) if "nf4" in p]
        assert "(a 4-bit trunk) runs on ZeRO-0/1/2 without pipeline stages" in problem
    assert not [p for p in layout_problems(cfg, {"zero_optimization": {"stage": 2}}, on_cuda=True) if "nf4" in p]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert "stores the trunk with bitsandbytes, which is not installed: pip install bitsandbytes" in \
        precision_problem(cfg, on_cuda=True)
