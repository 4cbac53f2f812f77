"""A grown phase on ZeRO-3 (2 ranks): the trunk frozen bitwise, the new block trained, and the losses of the same
phase on ZeRO-0 (1 rank) — the reference layout."""
import os

import torch
from safetensors.torch import load_file

from dist_utils import run_ranks
from test_train import ZERO, make_cfg

SCHEDULE = ("model.num_layers=2", "training.mode=fused", "training.block_size=1", "training.total_blocks=2",
            "training.steps_per_phase=3", "training.warmup_steps=0", "training.learning_rate=0.01",
            "training.fusion_mode=frozen", "memory.memory_layer_placement=all")


def _phase(out, stage, batch, p):
    from megamem.train.progressive import phase_config
    from megamem.train.trainer import Trainer
    from synthetic_data import factory

    cfg = phase_config(make_cfg(out, *SCHEDULE, f"training.batch_size={batch}"), p)
    cfg.training.init_data_from = None  # phase 0 ran on 1 rank for both layouts; a data position is per rank
    return Trainer(cfg, ZERO[stage], factory(61, batch, 16)).fit()


def test_a_fused_phase_on_zero3_freezes_the_trunk_and_trains_like_zero0(tmp_path):
    for name, stage, batch, ranks in (("one", 0, 4, 1), ("two", 3, 2, 2)):
        out = str(tmp_path / name)
        run_ranks(_phase, out, 0, 4, 0, world_size=1, tmp_path=tmp_path / f"{name}0")  # the same phase 0 for both
        run_ranks(_phase, out, stage, batch, 1, world_size=ranks, tmp_path=tmp_path / f"{name}1")
    losses = {}
    for name in ("one", "two"):
        before = load_file(str(tmp_path / name / "phase_0" / "final" / "model.safetensors"))
        after = load_file(str(tmp_path / name / "phase_1" / "final" / "model.safetensors"))
        trunk = [k for k in before if k.startswith("blocks.0.")]
        assert trunk and all(torch.equal(before[k], after[k]) for k in trunk), name  # frozen: bitwise unchanged
        assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("blocks."))  # head etc.
        assert torch.count_nonzero(after["blocks.1.attn.o_proj.weight"]) > 0  # grown at zero, then trained
        import json
        records = [json.loads(x) for x in open(os.path.join(tmp_path, name, "phase_1", "metrics.jsonl"))]
        losses[name] = torch.tensor([r["lm_loss"] for r in records if r["kind"] == "train"])
    assert len(losses["one"]) == 3 and torch.allclose(losses["two"], losses["one"], atol=1e-4, rtol=0)
