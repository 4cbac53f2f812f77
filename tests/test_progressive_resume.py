"""A progressive schedule stopped and restarted ends where the unbroken schedule ends: stopped after a phase
(the next run starts the next phase from its export) and preempted inside a phase (the rerun resumes it from
its checkpoint). The reference is the same schedule run without a stop; the per-phase summary and plot
(tools/progressive.py) are checked against the runs' own metrics files."""
import json
import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from synthetic_data import SyntheticLoader
from test_progressive import _tool
from test_train import ZERO, make_cfg

SCHEDULE = ("model.num_layers=2", "training.mode=fused", "training.block_size=1", "training.total_blocks=2", "training.steps_per_phase=4",
            "training.warmup_steps=1", "training.batch_size=2", "training.learning_rate=0.01",
            "training.eval_steps=2", "memory.memory_layer_placement=all")


def _run_in_process(preempt_at=None, data_read=None):
    """Stands in for the launcher: runs scripts/train.py's Trainer on a phase config in this process. With
    preempt_at=(phase, step) that phase receives SIGUSR1 during that step (a preemption notice) and exits 75."""
    from megamem.config import load_config
    from megamem.train.trainer import Trainer

    def run(cmd):
        cfg = load_config(cmd[cmd.index("--config") + 1])
        trainer = Trainer(cfg, ZERO[0], lambda split, rank, world: SyntheticLoader(61, 2, 16, rank, world, split))
        if preempt_at and preempt_at[0] == cfg.training.phase:
            step_fn = trainer.train_step

            def step_and_signal(batches):
                if trainer.step + 1 == preempt_at[1]:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return step_fn(batches)

            trainer.train_step = step_and_signal
        result = trainer.fit()
        if data_read is not None:
            data_read[cfg.training.phase] = trainer.train_loader.index  # batches read from the stream's start
        return 75 if result["preempted"] else 0

    return run


def test_a_stopped_and_preempted_schedule_ends_like_the_unbroken_one(tmp_path, capsys):
    from megamem.config import save_config

    tool = _tool()

    def config_file(out):
        path = str(tmp_path / f"{os.path.basename(out)}.yaml")
        save_config(make_cfg(out, *SCHEDULE), path)
        return path

    whole, read = str(tmp_path / "whole"), {}
    assert tool.main(["--config", config_file(whole)], run=_run_in_process(data_read=read)) == 0
    assert read == {0: 4, 1: 8}  # phase 1 read the stream on from phase 0's position (init_data_from)
    out = capsys.readouterr().out
    assert "phases.png" in out and os.path.isfile(os.path.join(whole, "phases.png"))

    broken = str(tmp_path / "broken")
    path = config_file(broken)
    assert tool.main(["--config", path, "--phase", "0"], run=_run_in_process()) == 0  # stop at the boundary
    assert not os.path.exists(os.path.join(broken, "phase_1"))
    assert tool.main(["--config", path], run=_run_in_process(preempt_at=(1, 3))) == 75  # preempted in phase 1
    assert "phase 1 was preempted" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(broken, "phase_1", "final"))
    ran = []
    resume = _run_in_process()
    assert tool.main(["--config", path], run=lambda cmd: ran.append(cmd) or resume(cmd)) == 0
    assert len(ran) == 1  # phase 0 is skipped, phase 1 resumed from its step-2 checkpoint
    assert yaml.safe_load(open(str(tmp_path / "broken" / "phase_1.yaml")))["training"]["resume_from_checkpoint"] \
        == "latest"

    for p in (0, 1):
        a = load_file(os.path.join(whole, f"phase_{p}", "final", "model.safetensors"))
        b = load_file(os.path.join(broken, f"phase_{p}", "final", "model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (p, name)

    # the summary joins the phases' own metrics on one token axis
    summary = json.load(open(os.path.join(broken, "phases.json")))
    for s in summary:
        records = [json.loads(line) for line in open(os.path.join(broken, f"phase_{s['phase']}", "metrics.jsonl"))]
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        assert s["steps"] == 4 and s["tokens"] == 4 * 2 * 16  # steps x batch x max_length
        assert s["train_loss"] == train[-1]["loss"] and s["eval_loss"] == evals[-1]["eval_loss"]
        assert s["start_tokens"] == s["phase"] * 4 * 2 * 16
        assert [x for x, _ in s["train_curve"]] == [s["start_tokens"] + st * 32 for st in range(1, 5)]


def test_init_data_from_reads_on_where_another_run_stopped(tmp_path):
    """Reference: one unbroken run of 5 steps; a run of 2 steps started from the data position of a 3-step run
    trains on exactly the unbroken run's batches 4 and 5 (the losses are those of the same model on them only if
    the batches are the same ones: here the weights differ, so the batches are compared directly)."""
    from megamem.config import ConfigError
    from megamem.train.trainer import Trainer

    seen = {}

    class Recording(SyntheticLoader):
        def __next__(self):
            batch = super().__next__()
            seen.setdefault(self.name, []).append(batch["input_ids"].clone())
            return batch

    def loaders(name):
        def make(split, rank, world):
            loader = Recording(61, 2, 16, rank, world, split)
            loader.name = f"{name}-{split}"
            return loader
        return make

    base = ("training.batch_size=2", "training.warmup_steps=0", "training.eval_steps=1000")
    Trainer(make_cfg(tmp_path / "whole", *base, "training.max_steps=5"), ZERO[0], loaders("whole")).fit()
    Trainer(make_cfg(tmp_path / "first", *base, "training.max_steps=3"), ZERO[0], loaders("first")).fit()
    Trainer(make_cfg(tmp_path / "next", *base, "training.max_steps=2",
                     f"training.init_data_from={tmp_path / 'first' / 'checkpoints'}"), ZERO[0], loaders("next")).fit()
    whole, nxt = seen["whole-train"], seen["next-train"]
    assert len(nxt) == 2 and all(torch.equal(a, b) for a, b in zip(nxt, whole[3:5]))
    with pytest.raises(ConfigError, match="training.init_data_from: no checkpoint at .*whole"):
        Trainer(make_cfg(tmp_path / "bad", *base, f"training.init_data_from={tmp_path / 'whole'}"), ZERO[0],
                loaders("bad"))
    with pytest.raises(ConfigError, match="remove one of init_data_from and resume_from_checkpoint"):
        make_cfg(tmp_path / "x", "training.init_data_from=/a", "training.resume_from_checkpoint=latest")
