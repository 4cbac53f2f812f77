"""Loader: exact resume (accumulation 2) for streaming text, local files and shards; disjoint ranks; mixtures."""
import json

import numpy as np
import pytest
import torch

from megamem.config import ConfigError
from megamem.data import build_loader
from megamem.data.mixture import Mixture
from megamem.data.shards import ShardWriter

from data_utils import data_config, make_docs, split_docs, tokenizer, write_jsonl


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _shards(tmp_path, texts, name="shards"):
    tok = tokenizer()
    for split in ("train", "validation"):
        w = ShardWriter(str(tmp_path / name / split), len(tok), tok.eos_token_id, shard_tokens=300)
        w.add(ids + [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"])
        w.finish()
    return tmp_path / name


def _config(tmp_path, kind, texts, *extra):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    if kind == "shards":
        return data_config(tmp_path, f"data.shards={_shards(tmp_path, texts)}", *extra)
    streaming = "true" if kind == "streaming" else "false"
    return data_config(tmp_path, f"data.datasets=[{{path: {path}, eval_path: {path}, streaming: {streaming}}}]",
                       "data.shuffle_buffer=16", *extra)


@pytest.mark.parametrize("kind", ["streaming", "local", "shards"])
def test_resume_after_micro_batches_with_accumulation_equals_unbroken_run(tmp_path, kind):
    cfg = _config(tmp_path, kind, make_docs(12), "training.gradient_accumulation_steps=2", "data.document_masking=true")
    tok = tokenizer()
    N, M, accum = 4, 7, cfg.training.gradient_accumulation_steps
    unbroken = build_loader(cfg, tok)
    ref = [next(unbroken) for _ in range((N + M) * accum)]  # crosses several epochs of this small corpus
    assert unbroken.epoch >= 2
    first = build_loader(cfg, tok)
    for _ in range(N * accum):  # the trainer calls next() once per micro-batch
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as in a checkpoint
    first.close()
    resumed = build_loader(cfg, tok)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(M * accum)]
    assert all(_same(a, b) for a, b in zip(ref[N * accum:], rest))
    assert not _same(ref[0], ref[N * accum])
    unbroken.close(), resumed.close()


def test_epochs_reshuffle_and_cover_the_data(tmp_path):
    texts = make_docs(12)
    cfg = data_config(tmp_path, f"training.dataset_name={write_jsonl(tmp_path / 'd.jsonl', [{'text': t} for t in texts])}",
                      "data.num_workers=0")
    tok = tokenizer()
    loader = build_loader(cfg, tok)
    src = loader.mixture.sources[0]
    orders = []
    for _ in range(2):
        order = [tuple(src.next_doc().ids) for _ in range(12)]
        orders.append(order)
    ref = sorted(tuple(ids + [tok.eos_token_id]) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    assert sorted(orders[0]) == sorted(orders[1]) == ref and orders[0] != orders[1] and src.epoch == 1


def test_resume_refuses_another_world_size(tmp_path):
    cfg = _config(tmp_path, "local", make_docs(20))
    tok = tokenizer()
    state = build_loader(cfg, tok, rank=0, world_size=2).state_dict()
    with pytest.raises(ConfigError, match="world_size 2 but this run has world_size 1"):
        build_loader(cfg, tok).load_state_dict(state)


@pytest.mark.parametrize("kind", ["streaming", "local", "shards"])
def test_two_ranks_read_disjoint_halves(tmp_path, kind):
    texts = make_docs(25)
    cfg = _config(tmp_path, kind, texts)
    tok = tokenizer()
    seen = [split_docs(list(build_loader(cfg, tok, "eval", rank=r, world_size=2))) for r in (0, 1)]
    ref = sorted(tuple(ids + [tok.eos_token_id]) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == ref
    assert min(len(s) for s in seen) >= 12
    train = [build_loader(cfg, tok, "train", rank=r, world_size=2) for r in (0, 1)]
    first = [set(split_docs([next(t) for _ in range(2)], partial=True)[1:]) for t in train]  # whole docs of each rank's start
    assert first[0] and first[1] and not first[0] & first[1]
    for t in train:
        t.close()


class FakeSource:
    def __init__(self, k):
        self.k, self.epoch, self.n = k, 0, 0

    def next_doc(self):
        self.n += 1
        return self.k

    def state(self):
        return {"n": self.n}

    def load_state(self, st):
        self.n = st["n"]


def _draws(weights, seed, n):
    mix = Mixture([FakeSource(k) for k in range(len(weights))], weights, seed, rank=0, train=True)
    return [mix.next_doc() for _ in range(n)]


def test_mixture_proportions_and_determinism():
    weights = [1.0, 2.0, 5.0]
    draws = _draws(weights, seed=3, n=20000)
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, np.array(weights) / sum(weights), atol=0.015)
    assert draws == _draws(weights, seed=3, n=20000)
    assert draws != _draws(weights, seed=4, n=20000)


def test_named_mix_from_file_end_to_end(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in make_docs(30, seed=1, prefix="alpha ")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": t, "a": "light"} for t in make_docs(30, seed=2, prefix="beta ")])
    mixes = tmp_path / "mixes.yaml"
    mixes.write_text(f"data_mixes:\n  ab:\n    - {{name: a, path: {a}, weight: 3}}\n"
                     f"    - {{name: b, path: {b}, weight: 1, text_template: 'Q: {{q}} A: {{a}}'}}\n")
    cfg = data_config(tmp_path, "data.data_mix=ab", f"data.data_mixes_file={mixes}", "data.num_workers=0")
    tok = tokenizer()
    loader = build_loader(cfg, tok)
    docs = split_docs([next(loader) for _ in range(40)], partial=True)[1:]
    text = [tok.decode(d[:-1]) for d in docs]
    n_a = sum(t.startswith("alpha") for t in text)
    n_b = sum(t.startswith("Q: beta") and t.endswith("A: light") for t in text)
    assert n_a + n_b == len(text) and 0.6 < n_a / len(text) < 0.9
    again = build_loader(cfg, tok)
    assert all(_same(next(again), x) for x in [next(build_loader(cfg, tok))])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data_mixes:\n  ab:\n    - {{name: a, path: {a}, wieght: 3}}\n")
    with pytest.raises(ConfigError, match=r"entry 0: unknown key 'wieght' \(did you mean 'weight'\?\)"):
        build_loader(data_config(tmp_path, "data.data_mix=ab", f"data.data_mixes_file={bad}"), tok)


def test_eval_fraction_holds_out_disjoint_documents(tmp_path):
    texts = make_docs(60)
    cfg = data_config(tmp_path, f"training.dataset_name={write_jsonl(tmp_path / 'd.jsonl', [{'text': t} for t in texts])}",
                      "data.eval_fraction=0.25", "data.num_workers=0")
    tok = tokenizer()
    held = set(split_docs(list(build_loader(cfg, tok, "eval"))))
    train = build_loader(cfg, tok)
    seen = set(tuple(train.mixture.sources[0].next_doc().ids) for _ in range(60 - len(held)))
    assert 5 <= len(held) <= 25 and not held & seen and len(held | seen) == 60


def test_shards_of_another_tokenizer_or_damaged_ids_are_refused(tmp_path):
    from megamem.data.tokenizer import tokenizer_fingerprint

    tok = tokenizer()
    texts = make_docs(6)
    for name, sha in (("other", "0" * 64), ("mine", tokenizer_fingerprint(tok))):
        for split in ("train", "validation"):
            w = ShardWriter(str(tmp_path / name / split), len(tok), tok.eos_token_id, tokenizer_sha256=sha)
            w.add(ids + [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"])
            w.finish()
    with pytest.raises(ConfigError, match="was tokenized with another tokenizer"):
        build_loader(data_config(tmp_path, f"data.shards={tmp_path / 'other'}"), tok)
    cfg = data_config(tmp_path, f"data.shards={tmp_path / 'mine'}")
    assert next(build_loader(cfg, tok))["input_ids"].max() < cfg.model.vocab_size  # the same tokenizer: fine
    tokens = np.memmap(tmp_path / "mine" / "train" / "shard_00000.bin", dtype=np.uint16, mode="r+")
    tokens[3] = cfg.model.vocab_size + 5  # a damaged byte range: never reaches the embedding
    tokens.flush()
    with pytest.raises(ConfigError, match=r"holds token id \d+ >= model.vocab_size .* the shard is damaged"):
        loader = build_loader(cfg, tok)
        for _ in range(20):
            next(loader)
