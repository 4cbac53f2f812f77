"""Progressive training (training.mode, megamem.train.progressive, tools/progressive.py). References are
independent of the phase code: which layers a phase owns is spelled out by hand, weights are compared with
their values before the phase, and a grown model with the smaller model it grew from."""
import importlib.util
import os

import pytest
import torch
import yaml

from conftest import ROOT, tiny_config
from dist_utils import run_ranks
from synthetic_data import SyntheticLoader
from test_train import ZERO, make_cfg

LRS = ("training.learning_rate=0.01", "training.memory_lr=0.02", "training.current_block_lr=0.05",
       "training.warmup_steps=0", "training.batch_size=2", "training.steps_per_phase=2")


def _phases(out, extra):
    """Run every phase in this process through the real Trainer; per phase: the weights before and after, and
    the optimizer groups as {name: (lr, parameter names)}."""
    from megamem.train.progressive import phase_config
    from megamem.train.trainer import Trainer

    cfg, results = make_cfg(out, *LRS, *extra), []
    for p in range(cfg.training.total_blocks or cfg.model.num_layers):
        trainer = Trainer(phase_config(cfg, p), ZERO[0], lambda split, rank, world: SyntheticLoader(61, 2, 16, rank,
                                                                                                       world, split))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.fit()
        results.append({"before": before, "after": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                        "groups": {g["name"]: (g["lr"], set(g["param_names"])) for g in trainer.groups}})
    return results


def _layer(name):
    return int(name.split(".")[1]) if name.startswith("blocks.") else None


@pytest.mark.parametrize("mode,extra,owns", [
    ("blockwise", ("training.block_size=2", "training.total_blocks=2", "training.fusion_mode=frozen"),
     [{0, 1}, {2, 3}]),
    ("layerwise", ("model.num_layers=2", "training.fusion_mode=trainable"), [{0}, {1}]),
])
def test_each_phase_trains_its_block_at_its_rate(tmp_path, mode, extra, owns):
    results = run_ranks(_phases, str(tmp_path / "run"), (f"training.mode={mode}", *extra), world_size=1,
                        tmp_path=tmp_path / "r")[0]
    assert len(results) == len(owns)
    for p, (r, current) in enumerate(zip(results, owns)):
        changed = {n for n in r["before"] if not torch.equal(r["before"][n], r["after"][n])}
        earlier = set(range(min(current)))
        trains_earlier = "training.fusion_mode=trainable" in extra
        for name in r["before"]:
            layer = _layer(name)
            if layer in current:
                assert name in changed, (p, name)
            elif layer is not None and (layer not in earlier or not trains_earlier):
                assert name not in changed, (p, name)  # frozen: bitwise unchanged
        assert any(n in changed for n in r["before"] if _layer(n) is None)  # embeddings, head, banks train
        groups = r["groups"]
        current_names = {n for n in r["before"] if _layer(n) in current}
        assert groups["current_block"][0] == 0.05 and groups["current_block_no_decay"][0] == 0.05
        assert groups["current_block"][1] | groups["current_block_no_decay"][1] == current_names
        base = groups["base"][1] | groups["base_no_decay"][1]
        assert groups["base"][0] == 0.01 and any(_layer(n) is None for n in base)
        assert all(lr == 0.02 for name, (lr, _) in groups.items() if name.startswith("memory"))
        in_groups = {n for _, names in groups.values() for n in names}
        if trains_earlier:  # earlier blocks train at their usual rates: base weights at learning_rate
            assert all(n in changed for n in r["before"] if _layer(n) in earlier)
            assert {n for n in base if _layer(n) is not None} == {n for n in r["before"] if _layer(n) in earlier
                                                                  and ".memory." not in n}
        else:
            assert not {n for n in in_groups if _layer(n) is not None} - current_names
        if p > 0:  # the phase starts from the previous phase's weights
            prev = results[p - 1]["after"]
            assert all(torch.equal(r["before"][n], prev[n]) for n in prev)


def _export_random(cfg, path):
    from megamem.folders import export_model
    from megamem.model import build_model

    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    export_model(model.state_dict(), cfg, None, path, 1)
    return model.eval()


def test_fused_growth_preserves_the_function_and_the_new_block_trains(tmp_path):
    from megamem.model import build_model
    from megamem.train.init_from import init_from
    from megamem.train.progressive import phase_config

    cfg = tiny_config("training.mode=fused", "training.block_size=2", "training.total_blocks=2",
                      f"training.output_dir={tmp_path / 'run'}", "memory.memory_layer_placement=all")
    first = phase_config(cfg, 0)
    assert first.model.num_layers == 2
    small = _export_random(first, os.path.join(first.training.output_dir, "final"))
    second = phase_config(cfg, 1)
    assert second.model.num_layers == 4 and second.training.init_from == os.path.join(str(tmp_path / "run"),
                                                                                         "phase_0", "final")
    assert second.training.init_from_new == ["blocks.2.*", "blocks.3.*"]
    torch.manual_seed(9)
    grown = build_model(second)
    init_from(grown, second, 0)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(grown.eval()(ids).logits, small(ids).logits)
    for name, value in small.state_dict().items():
        assert torch.equal(grown.state_dict()[name], value), name
    new = grown.blocks[2]
    assert torch.count_nonzero(new.attn.qkv_proj.weight) > 0 and torch.count_nonzero(new.attn.o_proj.weight) == 0
    grown.train()(ids, labels=ids).loss.backward()
    assert new.attn.o_proj.weight.grad.abs().sum() > 0 and new.mlp.down_proj.weight.grad.abs().sum() > 0


def _tool():
    spec = importlib.util.spec_from_file_location("megamem_tool_progressive", os.path.join(ROOT, "tools",
                                                                                             "progressive.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_phase_tool_skips_finished_phases_and_resumes_an_interrupted_one(tmp_path, capsys):
    tool, runs = _tool(), []

    def fake_train(cmd):  # stands in for scripts/train.py: records the phase, leaves a final export
        path = cmd[cmd.index("--config") + 1]
        t = yaml.safe_load(open(path))["training"]
        runs.append((t["phase"], t["init_from"], t["resume_from_checkpoint"], t["max_steps"]))
        os.makedirs(os.path.join(t["output_dir"], "final"), exist_ok=True)
        open(os.path.join(t["output_dir"], "final", "model.safetensors"), "w").close()
        return 0

    out = str(tmp_path / "run")
    cfg_path = str(tmp_path / "c.yaml")
    yaml.safe_dump({"model": {"hidden_dim": 32, "num_heads": 4, "num_kv_heads": 2, "num_layers": 3,
                              "intermediate_dim": 48, "vocab_size": 61, "max_seq_len": 64},
                    "training": {"mode": "layerwise", "steps_per_phase": 7, "max_length": 64, "output_dir": out}},
                   open(cfg_path, "w"))
    assert tool.main(["--config", cfg_path], run=fake_train) == 0
    assert runs == [(0, None, None, 7), (1, f"{out}/phase_0/final", None, 7), (2, f"{out}/phase_1/final", None, 7)]
    runs.clear()
    assert tool.main(["--config", cfg_path], run=fake_train) == 0
    assert runs == []  # every phase finished: nothing runs again
    os.remove(f"{out}/phase_2/final/model.safetensors")
    os.rmdir(f"{out}/phase_2/final")
    os.makedirs(f"{out}/phase_2/checkpoints/step00000003")
    open(f"{out}/phase_2/checkpoints/step00000003/COMPLETE", "w").write("3\n")
    assert tool.main(["--config", cfg_path], run=fake_train) == 0
    assert runs == [(2, f"{out}/phase_1/final", "latest", 7)]  # only the interrupted phase, resumed
    assert "skipped" in capsys.readouterr().out
