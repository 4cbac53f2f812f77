import glob
import os
import re
import subprocess
import sys

import pytest

from megamem.config import load_config
from megamem.model import build_model

from conftest import ROOT

TRAIN = os.path.join(ROOT, "scripts", "train.py")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def run(*args):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_dry_run_shipped_configs(path):
    proc = run("--config", path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    resolved = proc.stdout.split("# parameters")[0]
    assert "model:" in resolved and "memory:" in resolved and "training:" in resolved
    cfg = load_config(path)
    counts = build_model(cfg).parameter_counts() if cfg.model.hidden_dim <= 256 else None
    if counts:  # small configs: the printed counts (from a meta-device build) are the real model's
        for key in ("total", "memory", "trainable"):
            printed = re.search(rf"^{key}:\s+([\d,]+)", proc.stdout, re.M).group(1)
            assert int(printed.replace(",", "")) == counts[key]


def test_dry_run_prints_layout_and_per_rank_bank_bytes():
    env = {**os.environ, "WORLD_SIZE": "4"}
    proc = subprocess.run([sys.executable, TRAIN, "--config", os.path.join(ROOT, "configs", "base_small.yaml"),
                           "--dry-run", "--deepspeed", os.path.join(ROOT, "ds_configs", "zero3.json")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "world size 4, ZeRO-3: parameters (banks included) + gradients + optimizer state sharded" in proc.stdout
    assert "= 128 sequences per step" in proc.stdout  # 8 per rank x 4 accumulation x 4 ranks
    assert "bank 0: 0.79 MB of fp32 parameters per rank at rest (1/4 of 3.15 MB)" in proc.stdout


def test_dry_run_refuses_impossible_layout():
    proc = run("--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--dry-run", "--training.mixed_precision",
               "fp16")
    assert proc.returncode == 2 and "fp16 needs a GPU" in proc.stderr


def test_dry_run_with_overrides_prints_them(tmp_path):
    proc = run("--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--dry-run",
               "--memory.memory_sharing", "per_layer", "--memory.num_memory_tokens=64")
    assert proc.returncode == 0, proc.stderr
    assert "memory_sharing: per_layer" in proc.stdout and "num_memory_tokens: 64" in proc.stdout
    assert proc.stdout.count("bank ") == 2  # two memory layers, one bank each


@pytest.mark.parametrize("args,message", [
    (["--memory.num_memory_token", "5"], "unknown key 'memory.num_memory_token' (did you mean 'num_memory_tokens'?)"),
    (["--model.num_heads", "3"], "model.hidden_dim (128) must be divisible by model.num_heads (3)"),
    (["--memory.use_chapters", "true", "--memory.num_chapters", "4", "--memory.top_k_chapters", "4",
      "--memory.num_shared_chapters", "1"], "memory.top_k_chapters (4) must be <= num_chapters - num_shared_chapters (3)"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    proc = run("--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--dry-run", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_missing_config_file():
    proc = run("--config", "nope.yaml", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: config file not found: nope.yaml"


def test_dry_run_lists_peer_layers_with_their_parameters():
    peer = ("--model.use_peer", "true", "--model.peer_layer_placement", "custom", "--model.peer_layer_indices", "[0, 2]",
            "--model.peer_config.product_key_dim", "[8, 8]", "--model.peer_config.num_experts", "64",
            "--model.peer_config.num_experts_per_tok", "4", "--model.peer_config.num_heads", "2",
            "--model.peer_config.query_dim", "16", "--model.peer_config.expert_hidden_size", "2")
    proc = run("--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--dry-run", *peer)
    assert proc.returncode == 0, proc.stderr
    d = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml")).model.hidden_dim
    # by hand: query projection, BatchNorm affine, two sub-key sets of 8 x 16/2, the U and V tables (64 x 2 rows)
    params = d * 2 * 16 + 2 * 2 * 16 + 2 * 8 * 8 + 2 * 64 * 2 * d
    lines = proc.stdout.splitlines()
    assert "peer layers: [0, 2]" in lines and "memory layers: [1, 3]" in lines
    for i in (0, 2):
        assert (f"peer layer {i}: 64 experts of 2 neurons (product keys 8 x 8), 2 heads x 4 experts per token, "
                f"{params:,} parameters ({params / 1e3:.2f}K)") in lines
    plain = run("--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--dry-run")
    assert "peer layers: none" in plain.stdout.splitlines() and "peer layer " not in plain.stdout
