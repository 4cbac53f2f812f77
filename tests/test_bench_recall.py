"""The fact-recall benchmark: its corpus, its scorer against generate(), its arms, and one tiny run end to end."""
import json
import random
from collections import Counter

import pytest
import torch

from conftest import tiny_config
from megamem.config import ConfigError
from megamem.eval.recall import KnowledgeBase, documents, encode_prompts, recall, recall_table, word_tokenizer
from megamem.eval.recall.bench import ARMS, parameter_count
from megamem.eval.recall.corpus import ATTRIBUTES
from megamem.model import build_model
from test_niah_data import tool


def test_corpus_states_every_fact_the_asked_number_of_times_and_is_seeded():
    kb = KnowledgeBase.build(40, values_per_attribute=10, seed=3)
    assert KnowledgeBase.build(40, values_per_attribute=10, seed=3).facts == kb.facts
    assert KnowledgeBase.build(40, values_per_attribute=10, seed=4).facts != kb.facts
    assert len({f.name for f in kb.facts}) == 40 and len(kb.facts) == 80
    text = " ".join(documents(kb, 5, 4, 1.0, seed=1))
    stated = Counter()
    for fact in kb.facts:
        for template in ATTRIBUTES[fact.attribute]:
            stated[fact] += text.count(" " + template.format(name=fact.name, value=fact.value)) + \
                text.startswith(template.format(name=fact.name, value=fact.value))
    assert set(stated.values()) == {5}
    words = set(text.split())
    assert words <= set(kb.vocabulary)


class KnownAnswers(torch.nn.Module):
    """A stand-in model that answers a chosen set of prompts right (the value's id) and the rest wrong."""

    def __init__(self, answers, vocab):
        super().__init__()
        self.answers, self.vocab = answers, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], x.shape[1], self.vocab)
        for row, ids in enumerate(x.tolist()):
            logits[row, -1, self.answers[tuple(ids)]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_recall_counts_greedy_exact_matches_over_prompts_of_every_length(tmp_path):
    kb = KnowledgeBase.build(12, values_per_attribute=5, seed=0)
    tok = word_tokenizer(kb.vocabulary, str(tmp_path / "tok"))
    encoded = encode_prompts(tok, list(kb.prompts()))
    assert len({len(ids) for ids, _ in encoded}) > 2  # several prompt lengths: batched apart
    rng = random.Random(0)
    right = set(rng.sample(range(len(encoded)), 37))
    answers = {tuple(ids): target if i in right else (target + 1) % len(tok) for i, (ids, target) in enumerate(encoded)}
    assert recall(KnownAnswers(answers, len(tok)), encoded, batch_size=7) == pytest.approx(100 * 37 / len(encoded))
    # the word tokenizer: one id per word, decoded back to the words
    ids, target = encoded[5]
    assert tok.decode(ids + [target]) == " ".join(list(kb.prompts())[5])
    with pytest.raises(ConfigError, match="not in the tokenizer"):
        encode_prompts(tok, [("nobody lives in", "atlantis")])


def test_memory_off_is_the_vanilla_twin_with_the_same_weights(tmp_path):
    kb = KnowledgeBase.build(20, values_per_attribute=6, seed=1)
    tok = word_tokenizer(kb.vocabulary, str(tmp_path / "tok"))
    encoded = encode_prompts(tok, list(kb.prompts()))
    mem = tiny_config(f"model.vocab_size={len(tok)}", "memory.wo_init_zero=false", "memory.memory_top_k=4",
                      "memory.memory_qk_norm=true")
    twin_cfg = tiny_config(f"model.vocab_size={len(tok)}", "memory.vanilla_mode=true")
    torch.manual_seed(2)
    model = build_model(mem)
    with torch.no_grad():  # a memory that matters: large random reads
        for p in model.memory_parameters():
            p.mul_(30)
    twin = build_model(twin_cfg)
    missing = twin.load_state_dict({k: v for k, v in model.state_dict().items() if k in twin.state_dict()})
    assert not missing.missing_keys
    table = recall_table(model, encoded)
    assert table["off"] == recall(twin.eval(), encoded)
    assert recall(model, encoded) == table["on"]
    logits_on = model(torch.tensor([encoded[0][0]])).logits
    assert (logits_on - twin(torch.tensor([encoded[0][0]])).logits).abs().max() > 1e-3  # the memory matters here


def test_matched_arm_is_the_narrowest_vanilla_with_the_memory_models_parameters():
    cfg = tiny_config("memory.num_memory_tokens=40")
    extra = ARMS["matched"](cfg)
    width = int(extra[-1].split("=")[1])
    wide = tiny_config("memory.vanilla_mode=true", f"model.intermediate_dim={width}")
    narrower = tiny_config("memory.vanilla_mode=true", f"model.intermediate_dim={width - 8}")
    with torch.no_grad():
        counted = sum(p.numel() for p in build_model(cfg).parameters())
    assert parameter_count(cfg) == counted
    assert parameter_count(wide) >= counted > parameter_count(narrower)
    with pytest.raises(ConfigError, match="needs memory"):
        ARMS["memory"](tiny_config("memory.vanilla_mode=true"))


def test_bench_recall_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--out", str(out), "--people", "30", "--repeats", "2", "--arms", "vanilla", "memory",
            "--seeds", "0", "1", "--training.max_steps", "6", "--training.save_steps", "6",
            "--training.eval_steps", "6", "--training.logging_steps", "3", "--memory.num_memory_tokens", "64",
            "--model.num_layers", "2", "--memory.memory_layer_n", "1", "--memory.memory_block_variant", "C"]
    assert tool("bench_recall").main(args) == 0
    report = json.loads((out / "recall.json").read_text())
    assert [(r["arm"], r["seed"]) for r in report["runs"]] == [(a, s) for a in ("vanilla", "memory") for s in (0, 1)]
    for r in report["runs"]:
        assert set(r["recall"]) == ({"on"} if r["arm"] == "vanilla" else {"on", "off", "mean bank"})
    rows = {r["arm"]: r for r in report["arms"]}
    assert rows["memory"]["on mean"] == pytest.approx(sum(rows["memory"]["on"]) / 2)
    assert (out / "recall.png").stat().st_size > 0 and "| memory |" in (out / "recall.md").read_text()
    # a rerun keeps the trained runs and gives the same table; the matched arm (layout C in every layer leaves no
    # MLP, so the memory model has fewer parameters than vanilla and matched is vanilla's config) reuses vanilla's
    # runs instead of training them again
    capsys.readouterr()
    again = [*args[:7], "vanilla", "matched", "memory", *args[9:]]
    assert tool("bench_recall").main(again) == 0
    rerun = json.loads((out / "recall.json").read_text())
    assert [r for r in rerun["arms"] if r["arm"] != "matched"] == report["arms"]
    rows = {r["arm"]: r for r in rerun["arms"]}
    assert rows["matched"]["on"] == rows["vanilla"]["on"] and not list((out / "runs").glob("matched-*"))
    printed = capsys.readouterr().out
    assert "trained in" not in printed and "matched: the same config as vanilla" in printed
    with pytest.raises(ConfigError, match="another --people"):
        tool("bench_recall").main([*args[:2], "--people", "31", *args[4:]])
