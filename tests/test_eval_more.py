"""lm-eval offline on a shipped local task, remote-code policy, the ablation runner, long-context
scores during training — each against an independent computation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_config
from data_utils import make_docs, tokenizer_dir, write_jsonl
from dist_utils import run_ranks
from megamem.config import ConfigError
from test_eval_inference import exported, script

TASK = os.path.join(ROOT, "megamem", "eval", "tasks", "megamem_mc.jsonl")


def hand_accuracy(model, tok):
    """lm-eval's multiple-choice acc, recomputed: argmax over choices of log p(" choice" | prompt)."""
    docs = [json.loads(line) for line in open(TASK, encoding="utf-8")]
    right = 0
    for d in docs:
        context = f"Question: {d['question']}\nAnswer:"
        scores = []
        for choice in d["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids).logits.double().log_softmax(-1)[0]
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        right += int(np.argmax(scores) == d["answer"])
    return right / len(docs), len(docs)


def test_shipped_lm_eval_task_runs_offline_and_equals_a_hand_computation(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    final, hf, model, cfg, tok = exported(tmp_path, "model.max_seq_len=128")
    want, n = hand_accuracy(model, tok)
    assert n == 20
    for source in (final, hf):
        out = tmp_path / f"{os.path.basename(source)}.json"
        assert script("eval").main(["--model", source, "--no-perplexity", "--lm-eval-tasks", "megamem_mc",
                                    "--output", str(out)]) == 0
        got = json.loads(out.read_text())["lm_eval"]["megamem_mc"]
        assert got["acc,none"] == pytest.approx(want, abs=1e-9), source
    # the same task given as a YAML path, through the config's evaluation section
    yaml_path = os.path.join(ROOT, "megamem", "eval", "tasks", "megamem_mc.yaml")
    assert script("eval").main(["--model", final, "--benchmarks", "lm_eval", "--evals", yaml_path, "--lm-eval-limit",
                                "5", "--output", str(tmp_path / "y.json")]) == 0
    assert json.loads((tmp_path / "y.json").read_text())["lm_eval"]["megamem_mc"]["acc,none"] is not None
    # a registry task whose data lives on the hub: one line saying what to provide
    with pytest.raises(ConfigError) as e:
        script("eval").main(["--model", final, "--no-perplexity", "--lm-eval-tasks", "arc_easy"])
    assert "arc_easy: their data is on the Hugging Face hub" in str(e.value) and "\n" not in str(e.value)
    assert "--lm-eval-tasks path/to/task.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="no such task file"):
        script("eval").main(["--model", final, "--no-perplexity", "--lm-eval-tasks", "missing.yaml"])


def test_trust_remote_code_only_for_megamem_folders_or_with_the_flag(tmp_path, monkeypatch):
    import lm_eval

    from megamem.eval.lm_eval_glue import run_lm_eval

    seen = []
    monkeypatch.setattr(lm_eval, "simple_evaluate",
                        lambda **kw: seen.append(kw["model_args"]) or {"results": {"megamem_mc": {}}})
    _, megamem_hf, *_ = exported(tmp_path)
    foreign = tmp_path / "foreign"  # megamem's files, but with code megamem did not write
    foreign.mkdir()
    for name in os.listdir(megamem_hf):
        if os.path.isfile(os.path.join(megamem_hf, name)):
            (foreign / name).write_bytes(open(os.path.join(megamem_hf, name), "rb").read())
    with open(foreign / "modeling_megamem.py", "a") as f:
        f.write("\nprint('not megamem')\n")
    other = tmp_path / "other"  # another model type altogether
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    run_lm_eval(megamem_hf, ["megamem_mc"])
    run_lm_eval(str(foreign), ["megamem_mc"])
    run_lm_eval(str(other), ["megamem_mc"])
    run_lm_eval(str(foreign), ["megamem_mc"], trust_remote_code=True)
    assert [a["trust_remote_code"] for a in seen] == [True, False, False, True]
    assert script("eval").parse_args(["--model", "x", "--trust-remote-code"])[0].trust_remote_code


# ---------------------------------------------------------------- ablation runner
def ablation_config(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(24, seed=5)])
    text = f"""
model: {{hidden_dim: 32, num_heads: 4, num_kv_heads: 2, num_layers: 2, intermediate_dim: 48, vocab_size: 400,
        max_seq_len: 64, tokenizer_name: {tokenizer_dir()}}}
memory: {{num_memory_tokens: 8, wo_init_zero: false}}
training: {{max_length: 32, batch_size: 2, max_steps: 2, warmup_steps: 1, eval_steps: 2, eval_max_batches: 1,
           save_steps: 2, logging_steps: 1, mixed_precision: "no", output_dir: {tmp_path / 'runs'}}}
data: {{datasets: [{{path: {data}, eval_path: {data}}}], cache_dir: {tmp_path / 'cache'}}}
evaluation: {{ablation_mode: memory.num_memory_tokens, ablation_values: [4, 8]}}
"""
    (tmp_path / "abl.yaml").write_text(text)
    return str(tmp_path / "abl.yaml")


def test_ablation_runs_two_arms_writes_the_table_and_skips_finished_arms(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import ablate

    config, calls, real = ablation_config(tmp_path), [], ablate.run_step
    monkeypatch.setattr(ablate, "run_step", lambda cmd, log: calls.append(os.path.basename(cmd[1])) or real(cmd, log))
    out = tmp_path / "abl"
    assert ablate.main(["--config", config, "--output", str(out)]) == 0
    assert calls == ["train.py", "eval.py", "train.py", "eval.py"]
    table = json.loads((out / "ablation.json").read_text())
    assert table["key"] == "memory.num_memory_tokens" and [r["value"] for r in table["arms"]] == ["4", "8"]
    for arm, n in (("memory.num_memory_tokens=4", 4), ("memory.num_memory_tokens=8", 8)):
        saved = (out / arm / "final" / "config.yaml").read_text()
        assert f"num_memory_tokens: {n}" in saved
        ev = json.loads((out / arm / "eval.json").read_text())["perplexity"]
        row = next(r for r in table["arms"] if arm.endswith("=" + r["value"]))
        assert row["eval_ppl"] == pytest.approx(ev["ppl"]) and row["train_loss"] > 0
    assert (out / "ablation.png").stat().st_size > 0 and "| value |" in (out / "ablation.md").read_text()
    calls.clear()  # a rerun finds both arms finished
    assert ablate.main(["--config", config, "--output", str(out)]) == 0
    assert calls == []
    (out / "memory.num_memory_tokens=8" / "eval.json").unlink()  # only the missing evaluation is redone
    assert ablate.main(["--config", config, "--output", str(out)]) == 0
    assert calls == ["eval.py"]
    assert ablate.dotted_key("attractor", config, [], "true") == "model.attractor.use_attractor"
    assert ablate.dotted_key("alpha_policy", config, ["--model.attractor.use_attractor=true"], "fixed") == \
        "model.attractor.alpha_policy"
    with pytest.raises(ConfigError, match="--ablation-mode alpha_policy = bogus: .*alpha_policy"):
        ablate.main(["--config", config, "--ablation-mode", "alpha_policy", "--ablation-values", "bogus"])
    with pytest.raises(ConfigError, match="--ablation-mode memory.nonexistent"):
        ablate.main(["--config", config, "--ablation-mode", "memory.nonexistent", "--ablation-values", "1"])
    assert ablate.dotted_key("irrational", config, ["--model.pos_encoding.type=pi_spiral"], "e") == \
        "model.pos_encoding.irrational"


# ---------------------------------------------------------------- long context during training
def _long_context_run(out, data):
    from megamem.config import load_config
    from megamem.data import build_loader, load_tokenizer
    from megamem.eval.during_training import long_context_eval
    from megamem.train.trainer import Trainer

    cfg = load_config(data)
    cfg.training.output_dir = out
    tok = load_tokenizer(cfg)
    trainer = Trainer(cfg, None, lambda split, r, w: build_loader(cfg, tok, split, r, w), tokenizer=tok,
                      extra_eval=long_context_eval(cfg, tok))
    return trainer.fit()


def test_long_context_scores_are_logged_at_eval_steps(tmp_path):
    config = ablation_config(tmp_path)
    text = open(config).read().replace("max_steps: 2", "max_steps: 4").replace("max_seq_len: 64", "max_seq_len: 512")
    text = text.replace("evaluation: {ablation_mode: memory.num_memory_tokens, ablation_values: [4, 8]}",
                        "evaluation: {benchmarks: [niah], niah_lengths: [512], niah_depths: [0.5], num_samples: 1,"
                        " max_new_tokens: 4}\n")
    text = text.replace("save_steps: 2,", "save_steps: 2, eval_long_context: true,")
    (tmp_path / "lc.yaml").write_text(text)
    run_ranks(_long_context_run, str(tmp_path / "run"), str(tmp_path / "lc.yaml"), world_size=1,
              tmp_path=tmp_path / "r")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("niah_512_0.5" in r and r["niah_mean"] == r["niah_512_0.5"] for r in evals)
    # the last score equals scripts/eval.py's on the exported model (same weights, same samples)
    out = tmp_path / "e.json"
    assert script("eval").main(["--model", str(tmp_path / "run" / "final"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["niah"]["grid"]["512"]["0.5"] == evals[-1]["niah_512_0.5"]
    with pytest.raises(ConfigError, match="training.eval_long_context: evaluation.benchmarks names neither"):
        from megamem.config import load_config

        load_config(str(tmp_path / "lc.yaml"), ["--evaluation.benchmarks=[perplexity]"])


# ---------------------------------------------------------------- memory / throughput profile
def test_profile_cache_is_flat_with_a_window_and_grows_without(tmp_path):
    got = {}
    for name, extra in (("full", ()), ("window", ("model.window_size=16",))):
        (tmp_path / name).mkdir()
        final, _, model, cfg, _ = exported(tmp_path / name, "model.max_seq_len=256", *extra)
        out = tmp_path / f"{name}.json"
        assert script("eval").main(["--model", final, "--benchmarks", "profile", "--profile-lengths", "64", "128",
                                    "--profile-decode-tokens", "4", "--output", str(out)]) == 0
        res = json.loads(out.read_text())["profile"]
        assert (tmp_path / f"{name}_profile.png").stat().st_size > 0
        assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_rss_bytes"] >= 0
                   for r in res["lengths"].values())
        got[name] = (res, cfg)
    res, cfg = got["full"]
    m = cfg.model
    per_token = m.num_layers * 2 * m.num_kv_heads * (m.hidden_dim // m.num_heads) * 4  # K and V, fp32, every layer
    sizes = [res["lengths"][n]["cache_bytes"] for n in ("64", "128")]
    assert sizes[1] - sizes[0] == 64 * per_token and not res["cache_flat"]  # room for n + 4 tokens each
    res, cfg = got["window"]
    assert res["cache_flat"] and res["window_size"] == 16
    assert {r["cache_bytes"] for r in res["lengths"].values()} == {sizes[0] - (64 + 4 - 16) * per_token}  # 16 slots
    with pytest.raises(ConfigError, match="profile_lengths 256: with 4 decoded tokens it passes"):
        script("eval").main(["--model", str(tmp_path / "full" / "final"), "--benchmarks", "profile",
                             "--profile-lengths", "256", "--profile-decode-tokens", "4"])
