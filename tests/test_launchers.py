"""One code path for every launcher: `deepspeed --num_gpus 2` and `torchrun --nproc_per_node 2` run
scripts/train.py to the same losses (same world size → same weights and data split), and a plain
`python` run trains too. Real launchers, real processes, CPU ranks (gloo)."""
import json
import os
import subprocess
import sys

import pytest

from megamem.parallel.distributed import free_port

from conftest import ROOT
from data_utils import make_docs, tokenizer_dir, write_jsonl

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    data = write_jsonl(d / "docs.jsonl", [{"text": t} for t in make_docs(60)])
    return d, tokenizer_dir(), data


def _train(launcher, out, inputs):
    d, tok, data = inputs
    args = [os.path.join(ROOT, "scripts", "train.py"), "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
            "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json"),
            "--model.tokenizer_name", tok, f"--data.datasets=[{{path: {data}, eval_path: {data}}}]",
            "--training.output_dir", str(out), "--training.max_steps", "3", "--training.batch_size", "2",
            "--training.max_length", "32", "--training.eval_steps", "3", "--training.eval_max_batches", "1",
            "--training.logging_steps", "1", "--training.mixed_precision", "no", "--training.save_steps", "3"]
    # a free port each time: a fixed default (29500) collides with any other job on the machine
    cmd = {"deepspeed": [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())],
           "torchrun": [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"],
           "python": [sys.executable]}[launcher] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGAMEM_NO_PROGRESS": "1", "MASTER_ADDR": "127.0.0.1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(d), timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [r["lm_loss"] for r in records if r["kind"] == "train"], run.stdout


def test_deepspeed_and_torchrun_launchers_train_alike(tmp_path, inputs):
    ds, ds_log = _train("deepspeed", tmp_path / "ds", inputs)
    tr, _ = _train("torchrun", tmp_path / "tr", inputs)
    assert len(ds) == len(tr) == 3
    assert max(abs(a - b) for a, b in zip(ds, tr)) <= 1e-6, (ds, tr)
    assert "training: 2 ranks" in ds_log
    one, log = _train("python", tmp_path / "one", inputs)
    assert len(one) == 3 and "training: 1 rank" in log
    assert os.path.isfile(tmp_path / "one" / "final" / "model.safetensors")
