"""Pre-tokenized shards: flat numpy memmaps of token ids + document offsets, read at ~zero CPU cost.

Layout of a split folder (written by tools/preprocess_data.py):
  index.json              {"format": "megamem-shards-1", "dtype", "eos_token_id", "vocab_size", "tokenizer",
                           "tokenizer_sha256" (its vocabulary, checked against the run's tokenizer),
                           "max_token_id" (checked against model.vocab_size),
                           "shards": [{"name", "num_tokens", "num_docs"}]}
Every document read is range-checked too: a damaged shard never feeds an id past the vocabulary.
  <name>.bin              token ids (uint16 when the vocabulary fits, else uint32), documents end with eos
  <name>.idx.npy          int64 offsets of document starts, num_docs + 1 entries
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..config import ConfigError
from .instruction import Doc
from .sources import Source

FORMAT = "megamem-shards-1"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


class ShardWriter:
    """Appends tokenized documents; starts a new shard every `shard_tokens` tokens; index.json last.

    Writes into `<out_dir>.partial` and renames it to out_dir in finish(), so out_dir either holds a
    whole split or does not exist; abort() removes the partial folder (a failed run leaves nothing).
    """

    def __init__(self, out_dir: str, vocab_size: int, eos_token_id: int, tokenizer: str = "",
                 shard_tokens: int = 100_000_000, tokenizer_sha256: Optional[str] = None):
        if os.path.exists(out_dir):
            raise ConfigError(f"--out {out_dir} already exists; shards are written to a new folder: remove it or "
                              "choose another")
        self.final = out_dir
        out_dir = f"{out_dir.rstrip(os.sep)}.partial"
        if os.path.isdir(out_dir):  # left by an interrupted run: ours to replace
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        self.dir, self.dtype, self.shard_tokens = out_dir, token_dtype(vocab_size), shard_tokens
        self.meta = {"format": FORMAT, "dtype": np.dtype(self.dtype).name, "eos_token_id": eos_token_id,
                     "vocab_size": vocab_size, "tokenizer": tokenizer, "tokenizer_sha256": tokenizer_sha256,
                     "max_token_id": -1, "shards": []}
        self._f = None
        self._offsets: List[int] = []

    def _open(self) -> None:
        name = f"shard_{len(self.meta['shards']):05d}"
        self._f, self._name, self._offsets = open(os.path.join(self.dir, name + ".bin"), "wb"), name, [0]

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        np.save(os.path.join(self.dir, self._name + ".idx.npy"), np.asarray(self._offsets, dtype=np.int64))
        self.meta["shards"].append({"name": self._name, "num_tokens": self._offsets[-1],
                                    "num_docs": len(self._offsets) - 1})
        self._f = None

    def add(self, docs: Iterable[Sequence[int]]) -> None:
        for ids in docs:
            if self._f is None:
                self._open()
            arr = np.asarray(ids, dtype=self.dtype)
            if len(arr):
                self.meta["max_token_id"] = max(self.meta["max_token_id"], int(arr.max()))
            self._f.write(arr.tobytes())
            self._offsets.append(self._offsets[-1] + len(arr))
            if self._offsets[-1] >= self.shard_tokens:
                self._close()

    def finish(self) -> Dict[str, Any]:
        self._close()
        tmp = os.path.join(self.dir, "index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, "index.json"))
        os.rename(self.dir, self.final)
        self.dir = self.final
        return self.meta

    def abort(self) -> None:
        """Remove the partial folder (after an error): nothing half-written is left behind."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.dir != self.final and os.path.isdir(self.dir):
            shutil.rmtree(self.dir)


def read_index(path: str) -> Dict[str, Any]:
    index = os.path.join(path, "index.json")
    if not os.path.isfile(index):
        raise ConfigError(f"data.shards: no index.json in {path} (make shards with tools/preprocess_data.py)")
    with open(index) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"data.shards: {index} is not a {FORMAT} index")
    if not meta["shards"] or not sum(s["num_docs"] for s in meta["shards"]):
        raise ConfigError(f"data.shards: {path} holds no documents")
    return meta


class ShardSource(Source):
    """Documents from memmapped shards, in a seeded permutation per epoch; rank r takes every r-th."""

    def __init__(self, path: str, train: bool, seed: int, shuffle: bool, rank: int, world: int,
                 vocab_size: Optional[int] = None, eos_token_id: Optional[int] = None,
                 tokenizer_sha256: Optional[str] = None):
        super().__init__(f"shards {path}", train)
        meta = read_index(path)
        theirs = meta.get("tokenizer_sha256")
        if tokenizer_sha256 is not None and theirs is not None and theirs != tokenizer_sha256:
            raise ConfigError(f"data.shards: {path} was tokenized with another tokenizer ({meta.get('tokenizer')}, "
                              "a different vocabulary) than model.tokenizer_name; re-run tools/preprocess_data.py "
                              "with this run's tokenizer, or point model.tokenizer_name at that one")
        if vocab_size is not None and meta.get("max_token_id", -1) >= vocab_size:
            raise ConfigError(f"data.shards: {path} holds token id {meta['max_token_id']} but model.vocab_size is "
                              f"{vocab_size}: re-run tools/preprocess_data.py with this run's tokenizer")
        self.vocab_size = vocab_size
        if vocab_size is not None and meta["vocab_size"] > vocab_size:
            raise ConfigError(f"data.shards: {path} was tokenized with a {meta['vocab_size']}-token vocabulary "
                              f"but model.vocab_size is {vocab_size}")
        if eos_token_id is not None and meta["eos_token_id"] != eos_token_id:
            raise ConfigError(f"data.shards: {path} separates documents with eos id {meta['eos_token_id']} but "
                              f"the tokenizer's eos id is {eos_token_id}: re-run tools/preprocess_data.py")
        self.tokens = [np.memmap(os.path.join(path, s["name"] + ".bin"), dtype=meta["dtype"], mode="r")
                       for s in meta["shards"]]
        offsets = [np.load(os.path.join(path, s["name"] + ".idx.npy")) for s in meta["shards"]]
        self.offsets = offsets
        counts = np.array([len(o) - 1 for o in offsets])
        self.doc_start = np.concatenate([[0], np.cumsum(counts)])  # global doc index of each shard's first doc
        self.num_docs = int(counts.sum())
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self._order_cache: Dict[int, np.ndarray] = {}
        self.meta = meta

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order_cache:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs) \
                if self.shuffle and self.train else np.arange(self.num_docs)
            self._order_cache = {epoch: order[self.rank::self.world]}
        return self._order_cache[epoch]

    def doc(self, g: int) -> np.ndarray:
        s = int(np.searchsorted(self.doc_start, g, side="right")) - 1
        off = self.offsets[s]
        i = g - int(self.doc_start[s])
        ids = self.tokens[s][int(off[i]):int(off[i + 1])]
        if self.vocab_size is not None and len(ids) and int(ids.max()) >= self.vocab_size:  # a damaged shard
            raise ConfigError(f"data.shards: document {i} of {self.meta['shards'][s]['name']}.bin holds token id "
                              f"{int(ids.max())} >= model.vocab_size {self.vocab_size}: the shard is damaged; "
                              "re-run tools/preprocess_data.py")
        return ids

    def _items(self, epoch, pos):
        order = self._order(epoch)
        for k in range(pos, len(order)):
            yield Doc(self.doc(int(order[k])))
