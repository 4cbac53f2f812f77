"""A deterministic, learnable token stream with the loader protocol the trainer expects.

Row g of the global stream is an arithmetic sequence mod vocab (start and stride drawn from a
generator seeded by g), so a model can learn it and every rank/world-size split of the global
batch is reproducible: rank r takes rows [r*B, (r+1)*B) of each global batch of B*world rows.
"""
from __future__ import annotations

import torch


class SyntheticLoader:
    def __init__(self, vocab: int, batch: int, seq: int, rank: int = 0, world: int = 1, split: str = "train",
                 eval_batches: int = 3, seed: int = 0):
        self.vocab, self.batch, self.seq, self.rank, self.world = vocab, batch, seq, rank, world
        self.split, self.eval_batches, self.seed = split, eval_batches, seed
        self.index = 0  # global batches yielded so far

    def _row(self, g: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g + (10**9 if self.split == "eval" else 0))
        start = torch.randint(0, self.vocab, (1,), generator=gen)
        stride = torch.randint(1, 4, (1,), generator=gen)
        return (start + stride * torch.arange(self.seq)) % self.vocab

    def __iter__(self):
        if self.split == "eval":
            self.index = 0  # each iteration over eval data is one pass
        return self

    def __next__(self):
        if self.split == "eval" and self.index >= self.eval_batches:
            raise StopIteration
        first = (self.index * self.world + self.rank) * self.batch
        ids = torch.stack([self._row(first + i) for i in range(self.batch)])
        self.index += 1
        return {"input_ids": ids, "labels": ids.clone()}

    def state_dict(self):
        return {"index": self.index, "world": self.world}

    def load_state_dict(self, state):
        assert state["world"] == self.world
        self.index = state["index"]


def factory(vocab: int, batch: int, seq: int, seed: int = 0):
    return lambda split, rank, world: SyntheticLoader(vocab, batch, seq, rank, world, split, seed=seed)
