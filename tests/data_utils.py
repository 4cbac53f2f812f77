"""Small fixtures for the data tests: a SentencePiece tokenizer trained once, synthetic corpora."""
import functools
import json
import os
import random
import tempfile

from conftest import tiny_config

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there one all we their light water earth heaven").split()


def make_docs(n, seed=0, prefix=""):
    rng = random.Random(seed)
    return [f"{prefix}{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + "."
            for i in range(n)]


@functools.lru_cache(maxsize=None)
def tokenizer_dir():
    from megamem.data import train_sentencepiece

    out = os.path.join(tempfile.mkdtemp(prefix="megamem-tok-"), "tok")
    train_sentencepiece(make_docs(400, seed=1) + ["naïve café — 日本語 ünïcödé\ttabs\n\nnewlines 12345"] * 5,
                        out, vocab_size=400)
    return out


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def data_config(tmp_path, *overrides):
    return tiny_config(f"model.tokenizer_name={tokenizer_dir()}", "model.vocab_size=400", "training.max_length=32",
                       "training.batch_size=3", f"data.cache_dir={tmp_path / 'cache'}", *overrides)


def split_docs(batches, eos=2, pad=0, partial=False):
    """Token documents (each ending in eos) recovered from the non-padding tokens of batches."""
    stream = []
    for b in batches:
        for row, lab in zip(b["input_ids"].tolist(), b["labels"].tolist()):
            stream += [t for t, l in zip(row, lab) if l != -100 or t != pad]
    docs, cur = [], []
    for t in stream:
        cur.append(t)
        if t == eos:
            docs.append(tuple(cur))
            cur = []
    assert partial or not cur, "every document ends with eos"
    return docs
