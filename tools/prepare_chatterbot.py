#!/usr/bin/env python
"""Turn the English dialogues of the PyPI package `chatterbot-corpus` into chat jsonl files for
`training_mode: instruction_finetuning` (offline instruction-style data).

    pip install --no-deps chatterbot-corpus   (tools/setup_env.sh does this)
    python tools/prepare_chatterbot.py [--out data/chats/chatterbot]

A corpus conversation is a question followed by alternative answers; each answer becomes one
record {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}. Every 10th conversation
(by position in the sorted files, all its answers) goes to eval.jsonl, the rest to train.jsonl,
so no eval question is seen in training.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys

import yaml

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "chats", "chatterbot")


def corpus_dir(language: str = "english") -> str:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", language)


def conversations(folder: str):
    for path in sorted(glob.glob(os.path.join(folder, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for conv in data.get("conversations") or []:
            lines = [str(x).strip() for x in conv if x is not None and str(x).strip()]
            if len(lines) >= 2:  # the later lines are alternative answers to the first
                yield [[{"role": "user", "content": lines[0]}, {"role": "assistant", "content": answer}]
                       for answer in lines[1:]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--language", default="english")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    counts = {"train": 0, "eval": 0}
    with open(os.path.join(args.out, "train.jsonl"), "w", encoding="utf-8") as train, \
            open(os.path.join(args.out, "eval.jsonl"), "w", encoding="utf-8") as evaluation:
        for i, chats in enumerate(conversations(corpus_dir(args.language))):
            split = "eval" if i % 10 == 9 else "train"
            for chat in chats:
                (evaluation if split == "eval" else train).write(json.dumps({"messages": chat}) + "\n")
                counts[split] += 1
    print(f"wrote {counts['train']} train and {counts['eval']} eval chats to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
