"""End to end on CPU: a tiny megamem model trained on NIAH-format key→value chats finds held-out needles.

tools/make_niah_data.py writes the chats (the evaluation's own needle generator, seeded apart: no
evaluated needle is a training needle, tests/test_niah_data.py), scripts/train.py trains
configs/niah_tiny.yaml for a few hundred steps in one process, and scripts/eval.py --benchmarks niah
scores the final export. Chance is computed, not assumed: an untrained model of the same config,
exported and evaluated the same way, and a blind guess of the 7-digit value.
"""
import json
import os
import subprocess
import sys

from conftest import ROOT
from test_eval_inference import script
from test_niah_data import tool

TRAIN = ["--training.eval_steps", "900", "--training.eval_max_batches", "1"]  # configs/niah_tiny.yaml: 900 steps
EVAL = ["--benchmarks", "niah", "--num-samples", "8"]  # the config's grid: 136 and 160 tokens × depths 0, 0.5, 1
GUESS = 100 / 9_000_000  # the score of guessing a 7-digit value (1,000,000..9,999,999)


def niah_mean(model, out):
    assert script("eval").main(["--model", model, *EVAL, "--output", str(out)]) == 0
    grid = json.loads(out.read_text())["niah"]["grid"]
    cells = [v for row in grid.values() for v in row.values()]
    assert len(cells) == 6
    return sum(cells) / len(cells), grid


def export_untrained(final, out):
    """A model of the run's config as built before training (the run's seed), saved like the final export."""
    import torch
    from transformers import AutoTokenizer

    from megamem.config import load_config
    from megamem.folders import export_model
    from megamem.model import build_model

    cfg = load_config(str(final / "config.yaml"))
    torch.manual_seed(cfg.training.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name)
    export_model(build_model(cfg).state_dict(), cfg, tok, str(out), 0)
    return str(out)


def test_trained_tiny_model_finds_held_out_needles(tmp_path):
    data, tok, run = tmp_path / "niah", tmp_path / "tok", tmp_path / "run"
    assert tool("make_niah_data").main(["--out", str(data), "--tokenizer", str(tok), "--vocab-size", "640",
                                        "--min-length", "104", "--max-length", "144", "--train-docs", "3000",
                                        "--eval-docs", "16"]) == 0
    datasets = f"[{{path: {data}/train.jsonl, eval_path: {data}/validation.jsonl}}]"
    proc = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/niah_tiny.yaml", *TRAIN,
                           "--model.tokenizer_name", str(tok), "--data.datasets", datasets,
                           "--training.output_dir", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "MEGAMEM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    trained, grid = niah_mean(str(run / "final"), tmp_path / "trained.json")
    untrained, _ = niah_mean(export_untrained(run / "final", tmp_path / "untrained"), tmp_path / "untrained.json")
    print(f"NIAH mean: trained {trained:.1f} {grid}; untrained {untrained:.1f}; guessing {GUESS:.1e}")
    assert untrained == 0.0  # an untrained model never reproduces a 7-digit value
    assert trained >= 50.0 and trained > max(untrained, GUESS) + 45, grid
