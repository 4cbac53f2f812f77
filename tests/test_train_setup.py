"""DeepSpeed config resolution, refused layouts, parameter groups and schedules (no process group)."""
import json
import math
import os

import pytest
import torch

from megamem.config import ConfigError
from megamem.model import build_model
from megamem.train.ds_config import describe_layout, resolve_ds_config
from megamem.train.optim import build_optimizer, build_scheduler, parameter_groups

from conftest import ROOT, tiny_config

ZERO3 = os.path.join(ROOT, "ds_configs", "zero3.json")


def write_json(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_auto_values_come_from_the_yaml():
    cfg = tiny_config("training.batch_size=3", "training.gradient_accumulation_steps=4", "training.max_grad_norm=0.5",
                      "training.mixed_precision=bf16")
    ds = resolve_ds_config(ZERO3, cfg, world_size=2, on_cuda=False)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "ZeRO-3" in describe_layout(ds, 2) and "= 24 sequences per step" in describe_layout(ds, 2)


@pytest.mark.parametrize("ds,overrides,on_cuda,message", [
    ({"train_micro_batch_size_per_gpu": 16}, [], False,
     r"train_micro_batch_size_per_gpu = 16 conflicts with training.batch_size = 8 in the YAML"),
    ({"gradient_clipping": 5.0}, [], False, r"gradient_clipping = 5.0 conflicts with training.max_grad_norm = 1.0"),
    ({"optimizer": {"type": "Adam"}}, [], False, r"remove the 'optimizer' section: megamem builds the optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, [], False, r"remove the 'scheduler' section"),
    ({}, ["training.mixed_precision=fp16"], False, r"fp16 needs a GPU \(DeepSpeed has no fp16 on CPU\)"),
    ({"zero_optimization": {"stage": 3}}, ["memory.use_chapters=true", "memory.num_chapters=4",
                                           "memory.top_k_chapters=2", "parallel.ep_size=2"], False,
     r"DeepSpeed supports only with ZeRO stage 1 or 2 .*ds_configs/zero2.json"),
    ({"zero_optimization": {"stage": 2}, "pipeline": {"stages": 2}}, [], False,
     r"pipeline parallelism \(2 stages\) runs with ZeRO stage 0 or 1 only"),
])
def test_refused_layouts(tmp_path, ds, overrides, on_cuda, message):
    cfg = tiny_config("training.batch_size=8", *overrides)
    with pytest.raises(ConfigError, match=message):
        resolve_ds_config(write_json(tmp_path, ds), cfg, world_size=1, on_cuda=on_cuda)


def test_fp16_allowed_on_gpu(tmp_path):
    ds = resolve_ds_config(write_json(tmp_path, {}), tiny_config("training.mixed_precision=fp16"), 1, on_cuda=True)
    assert ds["fp16"]["enabled"] is True


def test_bad_ds_files(tmp_path):
    with pytest.raises(ConfigError, match="DeepSpeed config not found: nope.json"):
        resolve_ds_config("nope.json", tiny_config(), 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        resolve_ds_config(str(bad), tiny_config(), 1)


def test_parameter_groups_learning_rates_and_decay():
    cfg = tiny_config("training.memory_lr=0.01", "training.learning_rate=0.002", "training.weight_decay=0.1",
                      "memory.memory_sharing=per_layer")
    model = build_model(cfg)
    groups = {g["name"]: g for g in parameter_groups(model, cfg.training)}
    assert set(groups) == {"memory", "memory_no_decay", "base", "base_no_decay"}
    assert groups["memory"]["lr"] == 0.01 and groups["base"]["lr"] == 0.002
    assert groups["memory"]["weight_decay"] == 0.1 and groups["memory_no_decay"]["weight_decay"] == 0.0
    names = {g: set(groups[g]["param_names"]) for g in groups}
    assert {f"banks.{i}.memory" for i in range(4)} <= names["memory_no_decay"]  # banks: no decay by default
    assert "blocks.0.memory.norm.weight" in names["memory_no_decay"] and "norm.weight" in names["base_no_decay"]
    assert "blocks.0.attn.qkv_proj.weight" in names["base"]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    decayed = tiny_config("training.bank_weight_decay=true")
    names = {g["name"]: g["param_names"] for g in parameter_groups(build_model(decayed), decayed.training)}
    assert "banks.0.memory" in names["memory"]
    optimizer = build_optimizer(parameter_groups(model, cfg.training), cfg.training)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


def lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_schedule_shapes(kind):
    cfg = tiny_config(f"training.scheduler={kind}", "training.warmup_steps=10", "training.min_lr_ratio=0.1",
                      "training.memory_lr=1.0", "training.decay_start_ratio=0.6")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    curve = lrs(build_scheduler(opt, cfg.training, 100), 101)
    assert curve[0] == 0.0 and curve[5] == pytest.approx(0.5) and curve[10] == pytest.approx(1.0)  # linear warmup
    if kind == "constant":
        assert all(v == pytest.approx(1.0) for v in curve[10:])
    elif kind == "wsd":
        assert all(v == pytest.approx(1.0) for v in curve[10:61])  # stable until 60% of the steps
        assert curve[80] == pytest.approx(1.0 - 0.9 * 0.5) and curve[100] == pytest.approx(0.1)
    else:
        assert curve[100] == pytest.approx(0.1)
        mid = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 0.5))) if kind == "cosine" else 1.0 - 0.9 * 0.5
        assert curve[55] == pytest.approx(mid)


def test_warmup_ratio_overrides_steps():
    cfg = tiny_config("training.warmup_ratio=0.2", "training.warmup_steps=1", "training.scheduler=constant")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    curve = lrs(build_scheduler(opt, cfg.training, 50), 12)
    assert curve[5] == pytest.approx(0.5) and curve[10] == pytest.approx(1.0)


def test_fp8_is_refused_off_cuda_89_and_without_torchao(tmp_path, monkeypatch):
    """One line before anything is built; the capability and torchao checks are pure functions of what they are given."""
    from megamem.train import float8
    from megamem.train.float8 import float8_problem

    monkeypatch.setattr(float8, "device_capability", lambda: None)  # what a CPU machine reports, on any machine
    cfg = tiny_config("training.mixed_precision=fp8")
    with pytest.raises(ConfigError, match=r"fp8 needs CUDA compute capability ≥ 8.9 \(found: cpu\)"):
        resolve_ds_config(write_json(tmp_path, {}), cfg, world_size=1)
    assert "(found: 8.0)" in float8_problem((8, 0), True) and "(found: cpu)" in float8_problem(None, True)
    assert "pip install torchao" in float8_problem((9, 0), False)
    assert float8_problem((8, 9), True) is None and float8_problem((10, 0), True) is None


def test_fp8_converts_the_linears_it_can_and_keeps_the_head_and_routers():
    """The filter given to torchao's convert_to_float8_training: linear layers whose widths divide by 16, not the
    LM head nor a router (chapter routers score in fp32 on purpose); the expected set is listed by hand."""
    import torch.nn as nn

    from megamem.model import build_model
    from megamem.train.float8 import to_float8

    model = build_model(tiny_config("model.num_kv_heads=null", "model.intermediate_dim=64", "model.vocab_size=64",
                                    "model.tie_embeddings=false"))
    picked = {n for n, m in model.named_modules() if to_float8(m, n)}
    want = {f"blocks.{i}.{name}" for i in range(4) for name in
            ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "memory.attn.q_proj",
             "memory.attn.k_proj", "memory.attn.v_proj", "memory.attn.o_proj")}
    assert picked == want and tuple(model.lm_head.weight.shape) == (64, 32)  # the head divides by 16, yet stays
    assert not to_float8(nn.Linear(32, 24), "blocks.0.x") and to_float8(nn.Linear(32, 48), "blocks.0.x")
    assert not to_float8(nn.Linear(32, 32), "blocks.0.memory.router") and not to_float8(nn.Conv1d(16, 16, 1), "c")
