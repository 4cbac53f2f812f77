"""An output_dir holds one run: a new run never lands on it, a resume continues that same run
(same model, same layout, steps left), and metrics.jsonl reads as one run after a crash."""
import io
import json
import os
import sys


from megamem.config import ConfigError
from megamem.train.run_dir import truncate_metrics

from conftest import tiny_config
from dist_utils import run_ranks
from synthetic_data import factory
from test_train import ZERO, make_cfg


def _trainer(out, ds, *extra):
    from megamem.train.trainer import Trainer

    return Trainer(make_cfg(out, "training.batch_size=2", *extra), ds, factory(61, 2, 16))


def _refusals(out):
    """Each case on one rank; returns what each raised (or the warning it printed)."""
    _trainer(out, ZERO[0], "training.max_steps=2", "training.save_steps=1").fit()
    before = {p: os.path.getmtime(os.path.join(out, p)) for p in ("final/model.safetensors", "metrics.jsonl")}
    cases = {
        "new run": ("training.max_steps=2",),
        "finished": ("training.max_steps=2", "training.resume_from_checkpoint=latest"),
        "other model": ("training.max_steps=4", "training.resume_from_checkpoint=latest", "model.num_layers=3"),
        "other layout": ("training.max_steps=4", "training.resume_from_checkpoint=latest", "ds=1"),
        "other policy": ("training.max_steps=4", "training.resume_from_checkpoint=latest", "training.frozen=[norm.*]"),
    }
    result = {}
    for name, extra in cases.items():
        ds = ZERO[1] if "ds=1" in extra else ZERO[0]
        try:
            _trainer(out, ds, *[e for e in extra if e != "ds=1"])
            result[name] = None
        except ConfigError as e:
            result[name] = str(e)
    result["untouched"] = before == {p: os.path.getmtime(os.path.join(out, p)) for p in before}
    err, sys.stderr = sys.stderr, io.StringIO()
    try:  # a longer run: allowed, and the changed keys are reported
        trainer = _trainer(out, ZERO[0], "training.max_steps=4", "training.resume_from_checkpoint=latest",
                           "training.warmup_steps=3")
        result["warning"] = sys.stderr.getvalue()
        result["resumed_at"] = trainer.step
    finally:
        sys.stderr = err
    try:
        _trainer(os.path.join(os.path.dirname(out), "other"), ZERO[0], "training.max_steps=2", "training.num_gpus=8")
    except ConfigError as e:
        result["num_gpus"] = str(e)
    file_out = os.path.join(os.path.dirname(out), "a-file")
    open(file_out, "w").close()
    try:
        _trainer(file_out, ZERO[0], "training.max_steps=2")
    except ConfigError as e:
        result["file"] = str(e)
    return result


def test_output_dir_and_resume_refusals(tmp_path):
    out = str(tmp_path / "run")
    r = run_ranks(_refusals, out, world_size=1, tmp_path=tmp_path / "r")[0]
    assert r["new run"] == (f"training.output_dir {out} already holds a run (a final model (final/), checkpoints up "
                            "to step 2, metrics.jsonl); megamem never overwrites a run: continue it with "
                            "--training.resume_from_checkpoint latest, or choose another output_dir")
    ckpt = os.path.join(out, "checkpoints", "step00000002")
    assert r["finished"].startswith(f"checkpoint {ckpt} is at step 2 and this run trains 2 steps: the run is "
                                    "finished, there is nothing to resume. To train further raise training.max_steps")
    assert r["other model"] == (f"checkpoint {ckpt} holds another model (model.num_layers: 4 → 3); a resume "
                                "continues the same model: restore those keys, or start a new run from its weights "
                                f"with --training.init_from {ckpt}")
    assert r["other layout"].startswith(f"checkpoint {ckpt} was written under another parallel layout "
                                        "(zero_stage: 0 → 1); resume with the same layout")
    assert r["other policy"] == (f"checkpoint {ckpt} trained another set of parameters (training.frozen: None → "
                                 "['norm.*']); its optimizer state holds those: restore the keys, or start a new run "
                                 f"from its weights with --training.init_from {ckpt}")
    assert r["untouched"]  # refused before anything was written
    assert r["resumed_at"] == 2
    assert "resuming at step 2 with changed keys (each takes effect from there): training.max_steps: 2 → 4; " \
           "training.warmup_steps: 2 → 3" in r["warning"]
    assert r["num_gpus"].startswith("training.num_gpus = 8 but the launcher started 1 rank; launch 8")
    assert not (tmp_path / "other").exists()
    assert r["file"] == f"training.output_dir {tmp_path / 'a-file'} is a file; give a folder (it is created if missing)"


def test_truncate_metrics_keeps_records_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s}) for s in (1, 2, 3, 4)] + ['{"kind": "eval", "st']
    path.write_text("\n".join(lines) + "\n")
    assert truncate_metrics(str(tmp_path), 2) == 3  # steps 3, 4 and the line cut short by a crash
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(str(tmp_path / "none"), 2) == 0


def test_a_job_log_gets_a_line_per_logged_step(tmp_path, capsys):
    """Without a terminal (SLURM's job log) every logged step is a plain line next to metrics.jsonl."""
    from megamem.train.metrics import MetricsLogger

    log = MetricsLogger(tiny_config(f"training.output_dir={tmp_path}"), str(tmp_path), 0, total_steps=250)
    log.log({"kind": "train", "step": 10, "loss": 4.25, "lm_loss": 4.25, "lr": 1e-3, "grad_norm": 0.5,
             "tokens_per_s": 1234.5})
    log.log({"kind": "train", "step": 20, "loss": 4.0, "lm_loss": 4.0, "lr": 1e-3, "grad_norm": None,
             "tokens_per_s": 1000.0})
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert "step 10/250: loss 4.2500, lr 0.001, grad_norm 0.5, 1,234 tokens/s" in out
    assert "step 20/250: loss 4.0000, lr 0.001, grad_norm n/a, 1,000 tokens/s" in out
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]


def _resume_other_stage(out):
    """A checkpoint written before layouts were recorded, resumed under another ZeRO stage."""
    import glob

    from test_train import _fit

    import torch.distributed as dist

    _fit(out, ZERO[3], 2, ("training.max_steps=2", "training.save_steps=2"))
    if dist.get_rank() == 0:
        for path in glob.glob(os.path.join(out, "checkpoints", "*", "run_state_rank*.json")):
            with open(path) as f:
                state = json.load(f)
            state.pop("layout")
            with open(path, "w") as f:
                json.dump(state, f)
    dist.barrier()
    try:
        _fit(out, ZERO[1], 2, ("training.max_steps=4", "training.resume_from_checkpoint=latest"))
    except ConfigError as e:
        return str(e)


def test_an_unrecorded_layout_mismatch_is_one_clear_error(tmp_path):
    messages = run_ranks(_resume_other_stage, str(tmp_path / "run"), world_size=2, tmp_path=tmp_path / "r")
    for message in messages:  # DeepSpeed's bare AssertionError, named and explained on every rank
        assert message.startswith(f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'step00000002'} does not fit this "
                                  "run's parallel layout (AssertionError); resume with the ZeRO stage")


def _bad_data_run(out):
    from megamem.train.trainer import Trainer

    class BadRecord:
        def __iter__(self):
            return self

        def __next__(self):
            raise ConfigError("data.jsonl record 2 has no field 'text'")

        def state_dict(self):
            return {}

    trainer = Trainer(make_cfg(out, "training.max_steps=2"), ZERO[0],
                      lambda split, rank, world: BadRecord())
    try:
        trainer.fit()
    except ConfigError as e:
        return str(e)


def test_a_run_failing_on_its_first_batch_leaves_no_output_dir(tmp_path):
    out = tmp_path / "run"
    assert run_ranks(_bad_data_run, str(out), world_size=1, tmp_path=tmp_path / "r")[0].endswith("no field 'text'")
    assert not out.exists()


def _resume_damaged(out):
    _trainer(out, ZERO[0], "training.max_steps=2", "training.save_steps=2").fit()
    states = os.path.join(out, "checkpoints", "step00000002", "mp_rank_00_model_states.pt")
    data = open(states, "rb").read()
    results = {}
    for name, blob in (("truncated", data[:len(data) // 2]), ("pickle", b"\x80\x04cos\nsystem\n(S'touch "
                                                                        + os.path.join(out, "RAN").encode()
                                                                        + b"'\ntR.")):
        with open(states, "wb") as f:
            f.write(blob)
        try:
            _trainer(out, ZERO[0], "training.max_steps=4", "training.resume_from_checkpoint=latest")
        except ConfigError as e:
            results[name] = str(e)
    results["ran"] = os.path.exists(os.path.join(out, "RAN"))
    return results


def test_resuming_a_damaged_or_pickled_checkpoint_names_the_file(tmp_path):
    r = run_ranks(_resume_damaged, str(tmp_path / "run"), world_size=1, tmp_path=tmp_path / "r")[0]
    states = tmp_path / "run" / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    assert r["truncated"].startswith(f"{states}: not a readable weights file")
    assert r["pickle"].startswith(f"{states}: holds pickled objects that a weights-only load refuses")
    assert "weights_only=False" not in r["pickle"] and not r["ran"]
