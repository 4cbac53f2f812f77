"""tools/bench_progressive.py: three Stack-Wise arms at one token budget, each through the real tools (subprocesses
of scripts/train.py and tools/progressive.py). The references are the arms' own files, read here independently:
every metrics.jsonl record, the step counts times the configured batch, the saved arm configs."""
import json
import os
import sys

import pytest

from megamem.config import ConfigError

from conftest import ROOT
from data_utils import make_docs, tokenizer_dir, write_jsonl

BATCH, LENGTH = 2, 32


def base_config(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(40, seed=7)])
    text = f"""
model: {{hidden_dim: 32, num_heads: 4, num_kv_heads: 2, num_layers: 2, intermediate_dim: 48, vocab_size: 400,
        max_seq_len: 64, tokenizer_name: {tokenizer_dir()}}}
memory: {{num_memory_tokens: 8, memory_layer_placement: all, wo_init_zero: false}}
training: {{max_length: {LENGTH}, batch_size: {BATCH}, max_steps: 99, warmup_steps: 1, eval_steps: 2,
           eval_max_batches: 2, save_steps: 2, logging_steps: 5, mixed_precision: "no", learning_rate: 0.01,
           output_dir: {tmp_path / 'runs'}, mode: blockwise, block_size: 1, total_blocks: 2, steps_per_phase: 7,
           fusion_mode: trainable, current_block_lr: 0.02, qlora_rank: 2, qlora_alpha: 4, qlora_lr: 0.01}}
data: {{datasets: [{{path: {data}, eval_path: {data}}}], cache_dir: {tmp_path / 'cache'}}}
"""
    # the base's LoRA keys need LoRA on the trunk: the base itself is the blockwise schedule with it on
    text = text.replace("qlora_rank: 2", "qlora_enabled: true, qlora_rank: 2").replace("trainable", "frozen")
    (tmp_path / "base.yaml").write_text(text)
    return str(tmp_path / "base.yaml")


def records(folder):
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tool():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_progressive

    return bench_progressive


def test_three_arms_train_the_same_tokens_and_the_table_is_their_metrics(tmp_path, capsys):
    tool, config, out = _tool(), base_config(tmp_path), tmp_path / "bench"
    tokens = 2 * 3 * BATCH * LENGTH  # 2 phases of 3 steps; the full arm: 6 steps
    assert tool.main(["--config", config, "--tokens", str(tokens), "--out", str(out)]) == 0
    table = json.loads((out / "bench.json").read_text())
    rows = {r["arm"]: r for r in table["arms"]}
    assert list(rows) == ["full", "blockwise_frozen", "fused_lora"]
    runs = {"full": [out / "full"], "blockwise_frozen": [out / "blockwise_frozen" / f"phase_{p}" for p in (0, 1)],
            "fused_lora": [out / "fused_lora" / f"phase_{p}" for p in (0, 1)]}
    for arm, folders in runs.items():
        recs = [records(f) for f in folders]
        train = [[r for r in rs if r["kind"] == "train"] for rs in recs]
        # every step logged once (logging_steps 1 in every arm), so the summed step time covers all of them
        assert [[r["step"] for r in t] for t in train] == [list(range(1, 6 // len(folders) + 1))] * len(folders)
        steps = sum(t[-1]["step"] for t in train)
        assert steps * BATCH * LENGTH == tokens == rows[arm]["tokens"], arm
        assert rows[arm]["steps"] == steps and rows[arm]["phases"] == len(folders)
        last_eval = [r for r in recs[-1] if r["kind"] == "eval"][-1]
        assert last_eval["step"] == train[-1][-1]["step"]  # the final eval is at the arm's last step
        assert rows[arm]["eval_loss"] == last_eval["eval_loss"] and rows[arm]["eval_ppl"] == last_eval["eval_ppl"]
        assert rows[arm]["train_loss"] == train[-1][-1]["loss"]
        assert rows[arm]["step_time_s"] == pytest.approx(sum(r["step_time_s"] for t in train for r in t), rel=1e-12)
        assert rows[arm]["wall_s"] > rows[arm]["step_time_s"] > 0
        # the same eval set: every arm's final eval counts the same tokens
        assert last_eval["eval_tokens"] == [r for r in records(out / "full") if r["kind"] == "eval"][-1]["eval_tokens"]
    full = rows["full"]
    for r in rows.values():
        assert r["tokens_vs_full"] == 1.0
        assert r["wall_vs_full"] == pytest.approx(r["wall_s"] / full["wall_s"])
        assert r["ppl_vs_full"] == pytest.approx(r["eval_ppl"] / full["eval_ppl"], rel=1e-9)
    # each arm trained as named: its saved config and the optimizer groups it logged
    import yaml

    saved = {arm: yaml.safe_load((out / f"{arm}.yaml").read_text())["training"] for arm in runs}
    assert saved["full"]["mode"] == "full" and saved["full"]["max_steps"] == 6
    assert saved["blockwise_frozen"]["mode"] == "blockwise" and saved["blockwise_frozen"]["fusion_mode"] == "frozen"
    assert saved["fused_lora"]["mode"] == "fused" and saved["fused_lora"]["qlora_enabled"] is True
    assert all(saved[a]["seed"] == saved["full"]["seed"] for a in saved)
    full_rec = [r for r in records(out / "full") if r["kind"] == "train"][-1]
    block1 = [r for r in records(out / "blockwise_frozen" / "phase_1") if r["kind"] == "train"][-1]
    fused1 = [r for r in records(out / "fused_lora" / "phase_1") if r["kind"] == "train"][-1]
    assert "lr_current_block" not in full_rec and "lr_trunk_lora" not in block1
    assert block1["lr_current_block"] > 0 and fused1["lr_trunk_lora"] > 0
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "bench.md").read_text()
    assert all(f"| {arm} |" in md for arm in runs) and f"{full['eval_loss']:.4f}" in md

    capsys.readouterr()  # a rerun finds every arm finished: nothing trains, the wall times are kept
    assert tool.main(["--config", config, "--tokens", str(tokens), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished already") == 3
    again = {r["arm"]: r for r in json.loads((out / "bench.json").read_text())["arms"]}
    assert again == rows

    import shutil  # the full arm as if stopped after its step-4 checkpoint: the rerun resumes it there

    shutil.rmtree(out / "full" / "final")
    shutil.rmtree(out / "full" / "checkpoints" / "step00000006")
    (out / "full" / "checkpoints" / "latest").write_text("step00000004")
    assert tool.main(["--config", config, "--tokens", str(tokens), "--out", str(out)]) == 0
    assert yaml.safe_load((out / "full.yaml").read_text())["training"]["resume_from_checkpoint"] == "latest"
    assert (out / "full" / "final" / "model.safetensors").is_file()
    runs = json.loads((out / "wall.json").read_text())["full"]
    assert len(runs["runs"]) == 2 and runs["wall_s"] == pytest.approx(sum(r["wall_s"] for r in runs["runs"]))
    resumed = {r["arm"]: r for r in json.loads((out / "bench.json").read_text())["arms"]}
    assert resumed["full"]["steps"] == 6 and resumed["full"]["tokens"] == tokens
    assert resumed["full"]["eval_loss"] == pytest.approx(rows["full"]["eval_loss"], rel=1e-6)  # exact resume


def test_refusals_before_anything_trains(tmp_path):
    tool, config = _tool(), base_config(tmp_path)
    out = str(tmp_path / "never")
    with pytest.raises(ConfigError, match=r"--tokens 300: .* multiple of 128 \(e.g. 256 or 384\)"):
        tool.main(["--config", config, "--tokens", "300", "--out", out])
    with pytest.raises(ConfigError, match="training.mode: full"):
        tool.main(["--config", config, "--tokens", "128", "--out", out, "--training.mode=full",
                   "--training.block_size=null", "--training.total_blocks=null", "--training.steps_per_phase=null",
                   "--training.current_block_lr=null", "--training.qlora_enabled=null", "--training.qlora_rank=null",
                   "--training.qlora_alpha=null", "--training.qlora_lr=null"])
    with pytest.raises(ConfigError, match="arm fused_lora: .*grow only with memory placements"):
        tool.main(["--config", config, "--tokens", "128", "--out", out, "--memory.memory_layer_placement=last_k",
                   "--memory.memory_layer_k=1"])
    assert not os.path.exists(out)
