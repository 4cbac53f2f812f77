"""The training policy (megamem.train.trainable): training.trainable / frozen globs and LoRA on from-scratch
models, through the real Trainer. References are independent of the policy code: names picked by plain
string tests, the weights before training, a model without LoRA, and W + (alpha/r)·B·A computed here."""
import copy

import pytest
import torch

from conftest import tiny_config
from dist_utils import run_ranks
from synthetic_data import SyntheticLoader
from test_train import ZERO, make_cfg

LORA = ("memory.use_lora=true", "memory.lora_rank=4", "memory.lora_alpha=8", "memory.lora_dropout=0",
        "memory.lora_targets=[qkv_proj, o_proj, gate_up_proj, down_proj]")
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def _train(out, stage, extra):
    """Train 3 steps; the weights before and after, which require grad, the optimizer groups, and (LoRA) the
    trained model's logits beside the logits of the plain model loaded from the export."""
    from megamem.train.trainer import Trainer

    trainer = Trainer(make_cfg(out, "training.batch_size=2", "training.max_steps=3", "training.learning_rate=0.05",
                               "training.memory_lr=0.05", "training.lora_lr=0.05", "training.warmup_steps=0", *extra),
                      ZERO[stage], lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split))
    snap = lambda: {n: p.detach().clone() for n, p in trainer.model.named_parameters()}  # noqa: E731
    before = snap()
    trainer.fit()
    result = {"before": before, "after": snap(), "grad": {n for n, p in trainer.model.named_parameters()
                                                          if p.requires_grad},
              "groups": {g["name"]: (g["lr"], set(g["param_names"])) for g in trainer.groups}}
    if any("lora_" in n for n in before):
        from safetensors.torch import load_file

        from megamem.model import build_model

        plain = build_model(trainer.cfg)
        plain.load_state_dict(load_file(f"{out}/final/model.safetensors"), strict=False)
        with torch.no_grad():
            result["logits"] = trainer.model.eval()(IDS).logits, plain.eval()(IDS).logits
        result["export"] = load_file(f"{out}/final/model.safetensors")
        from megamem.hf.convert import read_source

        result["checkpoint"] = read_source(f"{out}/checkpoints")[0]  # the one reader of checkpoints merges too
    return result


def _changed(r, name):
    return not torch.equal(r["before"][name], r["after"][name])


def test_trainable_globs_train_only_the_matches(tmp_path):
    r = run_ranks(_train, str(tmp_path / "t"), 0, ("training.trainable=[blocks.*.memory.*, banks.*]",),
                  world_size=1, tmp_path=tmp_path / "r")[0]
    memory = {n for n in r["before"] if n.startswith("banks.") or ".memory." in n}
    assert memory and r["grad"] == memory
    assert all(_changed(r, n) for n in memory)
    assert not any(_changed(r, n) for n in set(r["before"]) - memory)  # bitwise unchanged
    assert {n for _, names in r["groups"].values() for n in names} == memory  # frozen: in no optimizer group


def test_frozen_globs_freeze_the_matches_under_zero2(tmp_path):
    r = run_ranks(_train, str(tmp_path / "f"), 2, ("training.frozen=[tok_embeddings.*, blocks.0.*]",),
                  world_size=1, tmp_path=tmp_path / "r")[0]
    frozen = {n for n in r["before"] if n.startswith(("tok_embeddings.", "blocks.0."))}
    assert frozen and r["grad"] == set(r["before"]) - frozen
    assert not any(_changed(r, n) for n in frozen)
    assert all(_changed(r, n) for n in r["grad"])


def test_lora_on_a_from_scratch_model_trains_only_lora_and_exports_merged(tmp_path):
    r = run_ranks(_train, str(tmp_path / "l"), 0, (*LORA, "memory.vanilla_mode=true"),
                  world_size=1, tmp_path=tmp_path / "r")[0]
    lora = {n for n in r["before"] if "lora_" in n}
    assert {n.split(".")[3] for n in lora if n.startswith("blocks.")} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                                          "down_proj"}
    assert r["grad"] == lora and all(_changed(r, n) for n in lora)
    assert not any(_changed(r, n) for n in set(r["before"]) - lora)  # base weights bitwise unchanged
    assert set(r["groups"]) == {"lora"} and r["groups"]["lora"][0] == 0.05  # lora_lr, and decay (2-D)
    # the export is the plain model: W + (alpha / r) B A, computed here
    export, after = r["export"], r["after"]
    assert not any("lora_" in k or "base_layer" in k for k in export)
    for n in lora:
        if ".lora_A." in n:
            module = n.split(".lora_A.")[0]
            a, b = after[n], after[f"{module}.lora_B.default.weight"]
            want = after[f"{module}.base_layer.weight"] + 2.0 * (b @ a)
            torch.testing.assert_close(export[f"{module}.weight"], want, rtol=1e-6, atol=1e-6)
    assert export.keys() == r["checkpoint"].keys()
    for k in export:
        torch.testing.assert_close(r["checkpoint"][k], export[k], rtol=1e-6, atol=1e-6)
    trained, merged = r["logits"]
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-5)  # merged = unmerged forward


def test_lora_starts_as_the_model_without_it_and_skips_memory():
    from megamem.adapter.lora import lora_scalings, merge_lora_state
    from megamem.model import build_model
    from megamem.train.trainable import apply_training_policy

    cfg = tiny_config(*LORA, "memory.use_both_memory_and_lora=true", "memory.wo_init_zero=false")
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    model = copy.deepcopy(plain)
    counts = apply_training_policy(model, cfg, seed=0)
    names = dict(model.named_parameters())
    assert not any("lora_" in n for n in names if ".memory." in n)  # memory cross-attention has o_proj too
    assert counts["lora"] == sum(p.numel() for n, p in names.items() if "lora_" in n) > 0
    assert {n for n, p in names.items() if p.requires_grad} == \
        {n for n in names if "lora_" in n or ".memory." in n or n.startswith("banks.")}  # use_both: memory trains
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain(IDS).logits)  # lora_B = 0: exactly the plain forward
        for n, p in names.items():
            if "lora_B" in n:
                p.normal_(std=0.05)
        plain.load_state_dict(merge_lora_state(model.state_dict(), lora_scalings(model)))
        torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(IDS).logits, build_model(cfg).eval()(IDS).logits)


def test_optimizer_groups_give_lora_its_rate_and_leave_frozen_out():
    from megamem.model import build_model
    from megamem.train.optim import parameter_groups
    from megamem.train.trainable import apply_training_policy

    cfg = tiny_config(*LORA, "memory.use_both_memory_and_lora=true", "training.frozen=[banks.*]",
                      "training.lora_lr=0.003", "training.memory_lr=0.02", "training.weight_decay=0.1")
    model = build_model(cfg)
    apply_training_policy(model, cfg)
    groups = {g["name"]: g for g in parameter_groups(model, cfg.training)}
    assert set(groups) == {"lora", "memory", "memory_no_decay"}
    assert groups["lora"]["lr"] == 0.003 and groups["lora"]["weight_decay"] == 0.1
    assert set(groups["lora"]["param_names"]) == {n for n, _ in model.named_parameters() if "lora_" in n}
    grouped = {n for g in groups.values() for n in g["param_names"]}
    assert not any(n.startswith("banks.") for n in grouped) and all(".memory." in n or "lora_" in n for n in grouped)


@pytest.mark.parametrize("overrides, message", [
    (["training.trainable=[bnks.*]"], r"training.trainable: pattern 'bnks.\*' matches no parameter; names start "
                                      r"with tok_embeddings.\*, banks.\*.memory, blocks.\*.attn_norm.\*, blocks.\*.attn.\*"),
    (["training.frozen=[blocks.*.mlp.*, nope]"], r"training.frozen: pattern 'nope' matches no parameter"),
    (["training.frozen=['*']"], r"nothing trains"),
    ([*LORA[:-1], "memory.vanilla_mode=true"], r"lora_targets \['q_proj', 'v_proj'\] name no module of the "
                                               r"from-scratch model .* \['down_proj', 'gate_up_proj', 'lm_head'"),
    ([*LORA, "training.trainable=[blocks.*.attn.qkv_proj.base_layer.*]", "memory.vanilla_mode=true"],
     r"matches only parameters the mode keys freeze .* model.freeze_base_model: false"),
])
def test_bad_policies_are_refused_with_the_key(overrides, message):
    from megamem.config import ConfigError
    from megamem.model import build_model
    from megamem.train.trainable import apply_training_policy

    with pytest.raises(ConfigError, match=message):
        apply_training_policy(build_model(tiny_config(*overrides)), tiny_config(*overrides))


def test_pipeline_refuses_the_policy_before_anything_starts(root):
    from megamem.config import ConfigError
    from megamem.train.ds_config import resolve_ds_config

    for extra, key in ((["training.trainable=[banks.*]"], "training.trainable"), ([*LORA, "memory.vanilla_mode=true"],
                                                                                  "memory.use_lora")):
        with pytest.raises(ConfigError, match=f"{key} is not supported with pipeline parallelism"):
            resolve_ds_config(f"{root}/ds_configs/pipeline.json", tiny_config(*extra), 2)


def _export(out, stage, extra):
    from safetensors.torch import load_file

    from megamem.train.trainer import Trainer

    Trainer(make_cfg(out, "training.batch_size=2", "training.max_steps=3", "training.learning_rate=0.05",
                     "training.lora_lr=0.05", "training.warmup_steps=0", *extra), ZERO[stage],
            lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split)).fit()
    return load_file(f"{out}/final/model.safetensors")


def test_lora_under_zero3_exports_what_zero0_exports(tmp_path):
    extra = (*LORA, "memory.use_both_memory_and_lora=true", "training.frozen=[blocks.0.memory.*]")
    zero0 = run_ranks(_export, str(tmp_path / "z0"), 0, extra, world_size=1, tmp_path=tmp_path / "r0")[0]
    zero3 = run_ranks(_export, str(tmp_path / "z3"), 3, extra, world_size=1, tmp_path=tmp_path / "r3")[0]
    assert zero0.keys() == zero3.keys() and not any("lora_" in k for k in zero0)
    for k in zero0:
        torch.testing.assert_close(zero3[k], zero0[k], rtol=1e-4, atol=5e-5)  # fp32 reduction order, after Adam


def test_dry_run_counts_after_the_policy(root, capsys):
    import importlib.util

    from megamem.model import build_model

    spec = importlib.util.spec_from_file_location("megamem_train_script", f"{root}/scripts/train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    config = f"{root}/configs/tiny_cpu.yaml"
    assert train.main(["--config", config, "--dry-run", "--training.trainable", "[banks.*, blocks.*.memory.*]"]) == 0
    out = capsys.readouterr().out
    from megamem.config import load_config

    with torch.device("meta"):
        names = dict(build_model(load_config(config)).named_parameters())
    want = sum(p.numel() for n, p in names.items() if n.startswith("banks.") or ".memory." in n)
    assert f"trainable: {want:>14,}" in out and want < sum(p.numel() for p in names.values())


def test_adapter_presets_are_narrowed_by_the_same_globs(tmp_path):
    from adapter_utils import adapter_config, saved_base

    from megamem.adapter import build_adapter_model
    from megamem.config import ConfigError
    from megamem.train.optim import parameter_groups
    from megamem.train.trainable import apply_training_policy

    path, _ = saved_base(tmp_path)
    cfg = adapter_config(path, "memory.use_both_memory_and_lora=true", "training.frozen=[branches.0.*]")
    model = build_adapter_model(cfg, seed=0)
    apply_training_policy(model, cfg)
    names = [n for n, _ in model.named_parameters()]
    want = {n for n in names if "lora_" in n or n.startswith("banks.") or
            (n.startswith("branches.") and not n.startswith("branches.0."))}  # the both-mode preset minus the glob
    assert any(n.startswith("branches.0.") for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert {n for g in parameter_groups(model, cfg.training) for n in g["param_names"]} == want
    with pytest.raises(ConfigError, match=r"training.trainable: pattern 'base.model.layers.0.\*' matches only "
                                          r"parameters the mode keys freeze .* model.freeze_base_model: false"):
        build_adapter_model(adapter_config(path, "training.trainable=[base.model.layers.0.*]"), seed=0)
