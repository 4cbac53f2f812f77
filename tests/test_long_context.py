"""Long-context evaluation: NIAH and RULER synthetic tasks — generators, scorers, runner, scripts/eval.py.

An oracle (solves each task from its prompt text, written here independently) scores 100 and a null
model 0; needles land once at the asked depth within the budget; the scorers follow RULER's formulas.
"""
import collections
import json
import random
import re

import pytest

from megamem.config import ConfigError
from megamem.eval.long_context import (NIAH, TASKS, TextModel, effective_length, make_sample, run_niah, run_ruler,
                                       string_match_all, string_match_part)

from test_eval_inference import exported, script


def words(text):
    return len(text.split())  # a whitespace "tokenizer": fast and exact to reason about


def oracle(prompt):
    """Answers every task from the prompt alone (the references are never seen)."""
    if "special magic" in prompt:
        kind = re.search(r"Some special magic (\w+) are hidden", prompt).group(1)
        query = re.search(rf"What are all the special magic {kind} for (.+?) mentioned", prompt).group(1)
        keys = [k.strip() for k in re.split(r",| and ", query) if k.strip()]
        found = re.findall(rf"One of the special magic {kind} for (\S+) is: (\S+?)\.(?:\s|$)", prompt)
        return " ".join(v for k, v in found if k in keys)
    if "VAR " in prompt:
        value = re.search(r"assigned the value (\d+) in the text", prompt).group(1)
        assign = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", prompt))
        holders, changed = {k for k, v in assign.items() if v == value}, True
        while changed:
            new = {k for k, v in assign.items() if v.startswith("VAR ") and v[4:] in holders}
            changed = not new <= holders
            holders |= new
        return " ".join(sorted(holders))
    if "numbered list of words" in prompt:
        items = re.findall(r"^\d+\. (\S+)$", prompt, re.M)
        return " ".join(w for w, _ in collections.Counter(items).most_common(10))
    if "coded text" in prompt:
        body = prompt.split("three most frequently appeared coded words. ", 1)[1].split("\nQuestion:")[0]
        return " ".join(w for w, _ in collections.Counter(body.split(" .... ")).most_common(3))
    raise AssertionError("unknown task prompt")


ORACLE = TextModel(words, oracle, None, "oracle")
NULL = TextModel(words, lambda prompt: "I do not know.", None, "null")


@pytest.mark.parametrize("task", TASKS)
def test_oracle_scores_100_and_null_0_on_every_task(task):
    for length in (400, 1500):
        rng = random.Random(task)
        samples = [make_sample(task, length, words, rng) for _ in range(3)]
        assert all(words(s.prompt) <= length for s in samples)
        refs = [s.references for s in samples]
        metric = string_match_all if samples[0].metric == "string_match_all" else string_match_part
        assert metric([oracle(s.prompt) for s in samples], refs) == 100.0
        assert metric(["I do not know." for _ in samples], refs) == 0.0


def test_budget_is_filled_not_exceeded():
    for task in TASKS:
        s = make_sample(task, 2000, words, random.Random(1))
        assert 2000 - 60 <= words(s.prompt) <= 2000, task  # one more sentence/word would not fit


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_needle_lands_once_at_the_asked_depth_reproducibly(depth):
    a = make_sample("niah_single_1", 3000, words, random.Random(7), depth=depth)
    b = make_sample("niah_single_1", 3000, words, random.Random(7), depth=depth)
    assert a.prompt == b.prompt and a.references == b.references  # same seed, same sample
    c = make_sample("niah_single_1", 3000, words, random.Random(8), depth=depth)
    assert c.references != a.references
    (value,) = a.references
    assert a.prompt.count(value) == 1
    needle = re.search(r"One of the special magic numbers for \S+ is: \d+\.", a.prompt).group(0)
    body = a.prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat are all", 1)[0]
    before, after = body.split(needle)
    total = words(before) + words(after)
    # at the sentence boundary at or before depth × haystack tokens: within one filler sentence (≤ 5 words)
    assert depth * total - 6 <= words(before) <= depth * total + 0.5
    assert before == "" or before.endswith(". ")  # between sentences


def test_multi_needle_tasks_place_every_needle_once():
    s = make_sample("niah_multikey_1", 2000, words, random.Random(3))
    assert len(re.findall(r"One of the special magic numbers", s.prompt)) == 4 and len(s.references) == 1
    s = make_sample("niah_multivalue", 2000, words, random.Random(3))
    assert len(s.references) == 4 and all(s.prompt.count(v) == 1 for v in s.references)
    s = make_sample("niah_multiquery", 2000, words, random.Random(3))
    assert len(s.references) == 4 and " and " in s.prompt.rsplit("What are all", 1)[1]
    s = make_sample("niah_multikey_2", 2000, words, random.Random(3))  # a haystack made of other needles
    assert len(re.findall(r"One of the special magic numbers", s.prompt)) > 50
    s = make_sample("niah_single_3", 600, words, random.Random(3))
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.references[0])


def test_scorers_follow_rulers_formulas():
    preds = ["the values are 123 and 456", "ABC", "nothing"]
    refs = [["123", "456", "789"], ["abc", "def"], ["x"]]
    assert string_match_all(preds, refs) == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)
    assert string_match_part(preds, refs) == pytest.approx(100 * (1 + 1 + 0) / 3)
    assert effective_length({1024: 99.0, 2048: 90.0, 4096: 80.0, 8192: 95.0}) == 2048  # first failure ends it
    assert effective_length({1024: 50.0}) is None
    assert effective_length({1024: 85.6}) == 1024


def test_runner_grid_and_ruler_summary():
    niah = run_niah(ORACLE, [300, 600], [0.0, 0.5, 1.0], 2, 0, 8)
    assert niah["grid"] == {n: {str(d): 100.0 for d in (0.0, 0.5, 1.0)} for n in ("300", "600")}
    ruler = run_ruler(NULL, ["vt", "niah_single_1"], [400, 800], 2, 0, 8, metrics=["string_match_part"])
    assert ruler["average"] == {"400": 0.0, "800": 0.0} and ruler["effective_length"] is None
    assert ruler["metrics"]["string_match_part"]["vt"] == {"400": 0.0, "800": 0.0}
    half = TextModel(words, lambda p: oracle(p) if words(p) < 500 else "", None)
    assert run_ruler(half, ["vt"], [400, 800], 2, 0, 8)["effective_length"] == 400
    limited = TextModel(words, oracle, 512)
    with pytest.raises(ConfigError, match="niah_lengths 1024: the model reads at most 512 tokens"):
        run_niah(limited, [1024], [0.5], 1, 0, 8)
    with pytest.raises(ConfigError, match=r"ruler_tasks \['qa_1'\]; valid"):
        run_ruler(ORACLE, ["qa_1"], [400], 1, 0, 8)


def test_eval_script_runs_niah_and_ruler_on_an_export(tmp_path, capsys):
    final, hf, model, cfg, tok = exported(tmp_path, "model.max_seq_len=1024")
    out = tmp_path / "res.json"
    args = ["--model", final, "--benchmarks", "niah", "ruler", "--niah-lengths", "512", "1024", "--niah-depths", "0",
            "1", "--ruler-tasks", "niah_single_1", "vt", "--ruler-lengths", "1024", "--num-samples", "2",
            "--max-new-tokens", "4", "--output", str(out)]
    assert script("eval").main(args) == 0
    res = json.loads(out.read_text())
    assert set(res["niah"]["grid"]) == {"512", "1024"} and set(res["ruler"]["scores"]) == {"niah_single_1", "vt"}
    assert all(0 <= v <= 100 for row in res["niah"]["grid"].values() for v in row.values())
    assert (tmp_path / "res_niah.png").is_file() and (tmp_path / "res_ruler.png").is_file()
    assert "perplexity" not in res  # --benchmarks replaces the default
    with pytest.raises(ConfigError, match="niah_lengths 2048: the model reads at most 1024 tokens"):
        script("eval").main(["--model", final, "--benchmarks", "niah", "--niah-lengths", "2048"])
    with pytest.raises(ConfigError, match="niah_single_1: a budget of 96 tokens cannot hold even the question"):
        script("eval").main(["--model", final, "--benchmarks", "niah", "--niah-lengths", "100", "--max-new-tokens", "4"])
    with pytest.raises(ConfigError, match=r"evaluation.niah_depths \[1.5\]"):
        script("eval").main(["--model", final, "--benchmarks", "niah", "--niah-depths", "1.5"])


def test_chat_template_puts_the_answer_prefix_in_the_reply(tmp_path):
    from megamem.eval import Loaded
    from megamem.eval.long_context import text_model
    from megamem.eval.long_context.tasks import ANSWER

    final, hf, model, cfg, tok = exported(tmp_path)
    loaded = Loaded(hf=None, tokenizer=tok, cfg=cfg)
    prompt = f"Where is the key?{ANSWER} The key is"
    with_template = tok.apply_chat_template([{"role": "user", "content": "Where is the key?"}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
    on = text_model(loaded, 4, chat_template="on")
    assert on.count(prompt) == len(with_template) + len(tok("The key is", add_special_tokens=False)["input_ids"])
    off = text_model(loaded, 4, chat_template="off")
    assert off.count(prompt) == len(tok("Where is the key? The key is")["input_ids"])
    assert on.max_length == cfg.model.max_seq_len


def test_the_config_knows_every_generated_task():
    from megamem.config.schema import RULER_TASKS

    assert tuple(RULER_TASKS) == TASKS and tuple(RULER_TASKS[:8]) == tuple(NIAH)
