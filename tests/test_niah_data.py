"""tools/make_niah_data.py: NIAH-format training documents that the trainer reads exactly as the evaluation asks.

A chat record, encoded by the training data path (instruction_finetuning), must give the token ids
scripts/eval.py feeds a model with a chat template for the same prompt, followed by the answer —
and only the reply carries loss; a text record must equal `--chat-template off`'s prompt plus the
answer. No needle the NIAH grid asks about is a training needle.
"""
import importlib.util
import json
import os
import re

import pytest

from conftest import ROOT, tiny_config
from megamem.config import ConfigError


def tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(folder, tokenizer folder): 60 chat and 60 text documents, the tokenizer trained by the tool."""
    root = tmp_path_factory.mktemp("niah")
    make = tool("make_niah_data")
    for form in ("chat", "text"):
        args = ["--out", str(root / form), "--tokenizer", str(root / "tok"), "--train-docs", "60", "--eval-docs", "4",
                "--min-length", "128", "--max-length", "192", "--format", form]
        assert make.main(args + (["--vocab-size", "640"] if form == "chat" else [])) == 0
    return root, str(root / "tok")


def records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


class Recorder:
    """A TextModel's answer function that records the prompts and answers nothing."""

    def __init__(self):
        self.prompts = []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        return ""


def fed_ids(tok, prompt, chat_template):
    """The token ids scripts/eval.py's long-context path feeds a model for this prompt (its generate input)."""
    import torch

    from megamem.eval import Loaded
    from megamem.eval.long_context import text_model

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, x, **kwargs):
            self.seen = x[0].tolist()
            return x

    spy = Spy()
    text_model(Loaded(hf=spy, tokenizer=tok, cfg=tiny_config()), 10, chat_template=chat_template).answer(prompt)
    return spy.seen


def test_chat_records_encode_to_the_evaluated_prompt_then_the_answer(made):
    from transformers import AutoTokenizer

    from megamem.data.instruction import Encoder
    from megamem.eval.long_context.tasks import ANSWER

    root, tok_dir = made
    tok = AutoTokenizer.from_pretrained(tok_dir)
    encoder = Encoder(tok, "instruction_finetuning", 4096, "messages", None)
    recs = records(root / "chat" / "train.jsonl")
    docs = encoder.encode(recs, [f"record {i}" for i in range(len(recs))])
    for rec, doc in zip(recs, docs):
        question, reply = rec["messages"][0]["content"], rec["messages"][1]["content"]
        prefix, value = re.fullmatch(r"( The special magic numbers for \S+ mentioned in the provided text are)"
                                     r" (\d{7})\.", reply).groups()
        prompt = fed_ids(tok, question + ANSWER + prefix, "auto")  # the tokenizer has a chat template: used
        answer = tok(f" {value}.", add_special_tokens=False)["input_ids"]
        ids, n = list(doc.ids), len(prompt)
        assert ids[:n] == prompt  # training reads what the evaluation feeds ...
        assert ids[n:n + len(answer)] == answer  # ... then the answer, where generation starts
        reply_start = n - len(tok(prefix.lstrip(), add_special_tokens=False)["input_ids"])
        assert not any(doc.trained[:reply_start]) and all(doc.trained[reply_start:n + len(answer)])  # reply alone
        assert 128 - 16 <= len(tok(question + prefix, add_special_tokens=False)["input_ids"]) <= 192  # whole sentences


def test_text_records_are_the_plain_prompt_and_answer(made):
    from transformers import AutoTokenizer

    from megamem.eval.long_context.tasks import ANSWER

    root, tok_dir = made
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for rec in records(root / "text" / "train.jsonl"):
        question, prefix, value = re.fullmatch(r"(.*provided text\?)( The special magic numbers for \S+ mentioned in "
                                               r"the provided text are) (\d{7})\.", rec["text"], re.S).groups()
        assert question.startswith("Some special magic numbers are hidden within the following text.")
        assert len(re.findall(r"One of the special magic numbers for \S+ is: \d{7}\.", question)) == 1
        assert f"is: {value}." in question  # the answer is the needle's value
        prompt = fed_ids(tok, question + ANSWER + prefix, "off")
        ids = tok(rec["text"], add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt)] == prompt and 128 - 16 <= len(prompt) <= 192


def test_evaluated_needles_are_not_training_needles(made):
    from megamem.eval.long_context import TextModel, run_niah

    root, tok_dir = made
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    recorder = Recorder()
    model = TextModel(lambda t: len(tok(t, add_special_tokens=False)["input_ids"]), recorder, None)
    run_niah(model, [160, 224], [0.0, 0.5, 1.0], 10, 0, 10)  # the evaluation's default seed
    asked = {m for p in recorder.prompts for m in re.findall(r"is: (\d{7})\.", p)}
    trained = set()
    for form in ("chat", "text"):
        for split in ("train", "validation"):
            trained |= set(re.findall(r"is: (\d{7})\.", (root / form / f"{split}.jsonl").read_text()))
    assert len(asked) == 60 and len(trained) == 64 and not asked & trained  # chat and text: one seed
    train_chat = {r["messages"][0]["content"] for r in records(root / "chat" / "train.jsonl")}
    valid_chat = {r["messages"][0]["content"] for r in records(root / "chat" / "validation.jsonl")}
    assert not train_chat & valid_chat


def test_bad_lengths_are_refused(made):
    root, tok_dir = made
    make = tool("make_niah_data")
    with pytest.raises(ConfigError, match="a budget of 40 tokens cannot hold even the question"):
        make.main(["--out", str(root / "x"), "--tokenizer", tok_dir, "--min-length", "40", "--max-length", "40"])
    with pytest.raises(ConfigError, match=r"lengths 200\.\.100: need 0 < min_length <= max_length"):
        make.main(["--out", str(root / "x"), "--tokenizer", tok_dir, "--min-length", "200", "--max-length", "100"])
