#!/usr/bin/env python
"""Write synthetic key→value training data in the NIAH format (train.jsonl, validation.jsonl).

    python tools/make_niah_data.py --out data/niah --tokenizer data/tokenizers/niah-640 --vocab-size 640 \
        --min-length 104 --max-length 144
    python tools/make_niah_data.py --out data/niah --tokenizer data/tokenizers/kjv-4096   # an existing tokenizer

Each record is one needle-in-a-haystack sample of the evaluation's own generator
(megamem.eval.long_context, `--task`, default niah_single_1: a random 7-digit value for a random
key in RULER's noise haystack) and its answer, its prompt filling a budget of `--min-length` to `--max-length`
tokens of the tokenizer (whole haystack sentences), the needle at a random depth: `--format chat` (default) writes
{"messages": [user: the question, assistant: the answer prefix and value]}, read the way
`scripts/eval.py` reads a model with a chat template; `--format text` writes {"text": ...}, the
plain prompt and answer (`--chat-template off`). Samples are drawn from seeds apart from
the evaluation's, so `scripts/eval.py --benchmarks niah` asks about needles never trained on.
With `--vocab-size` the tokenizer is first trained here (SentencePiece, as tools/train_tokenizer.py)
on NIAH text and saved at `--tokenizer`. configs/niah_tiny.yaml trains on it
(`training_mode: instruction_finetuning`: the answer alone carries loss).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402
from megamem.eval.long_context import NIAH  # noqa: E402
from megamem.eval.long_context.train_docs import niah_documents  # noqa: E402

TOKENIZER_DOCS = (400, 100, 300)  # the tokenizer's training text: NIAH documents, 100 to 300 words each


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train.jsonl and validation.jsonl")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer folder that sizes the documents (made here with --vocab-size)")
    p.add_argument("--vocab-size", type=int, help="train a SentencePiece tokenizer of this size at --tokenizer first")
    p.add_argument("--train-docs", type=int, default=4000)
    p.add_argument("--eval-docs", type=int, default=200)
    p.add_argument("--min-length", type=int, default=104, help="shortest prompt budget, in tokens")
    p.add_argument("--max-length", type=int, default=144, help="longest prompt budget, in tokens")
    p.add_argument("--task", choices=list(NIAH), default="niah_single_1")
    p.add_argument("--haystack", help="noise | corpus | a text file (default: the task's own)")
    p.add_argument("--format", choices=["chat", "text"], default="chat",
                   help="chat: {messages: [user question, assistant answer]} for instruction_finetuning (the answer "
                        "alone carries loss); text: {text: question and answer} for pretraining")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def record(question: str, reply: str, form: str) -> dict:
    if form == "text":
        return {"text": question + reply}
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def write_jsonl(path: str, pairs, form: str) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for question, reply in pairs:
            f.write(json.dumps(record(question, reply, form)) + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    start = time.perf_counter()
    if args.vocab_size:
        from megamem.data.tokenizer import train_sentencepiece

        words = lambda text: len(text.split())  # noqa: E731 - sizes the tokenizer's own training text
        texts = [q + r for q, r in niah_documents(words, *TOKENIZER_DOCS, args.seed + 1, args.task, args.haystack)]
        train_sentencepiece(texts, args.tokenizer, args.vocab_size, num_threads=1)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    def docs(num: int, seed: int):
        return niah_documents(count, num, args.min_length, args.max_length, seed, args.task, args.haystack)

    n_train = write_jsonl(os.path.join(args.out, "train.jsonl"), docs(args.train_docs, args.seed), args.format)
    n_eval = write_jsonl(os.path.join(args.out, "validation.jsonl"), docs(args.eval_docs, args.seed + 10_000),
                         args.format)
    print(f"wrote {n_train} train and {n_eval} validation documents ({args.task}, {args.min_length}-"
          f"{args.max_length} tokens) to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
