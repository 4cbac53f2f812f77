"""Several sources interleaved by weight: which source gives the next document is a pure function
of (seed, rank, draw number), so the mixture's state is one integer plus its sources' states."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from .instruction import Doc
from .sources import Source

_BLOCK = 4096


class Mixture:
    def __init__(self, sources: List[Source], weights: List[float], seed: int, rank: int, train: bool):
        self.sources, self.train, self.seed, self.rank = sources, train, seed, rank
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.draws = 0  # train: documents drawn so far; eval: index of the source being read
        self._block, self._choices = -1, None

    def _choice(self, k: int) -> int:
        block = k // _BLOCK
        if block != self._block:
            rng = np.random.default_rng([self.seed, self.rank, block, 0x6D6978])
            self._block, self._choices = block, rng.choice(len(self.sources), size=_BLOCK, p=self.p)
        return int(self._choices[k % _BLOCK])

    def next_doc(self) -> Doc:
        if not self.train:  # eval: every source once, in order
            while self.draws < len(self.sources):
                try:
                    return self.sources[self.draws].next_doc()
                except StopIteration:
                    self.draws += 1
            raise StopIteration
        if len(self.sources) == 1:
            return self.sources[0].next_doc()
        i = self._choice(self.draws)
        self.draws += 1
        return self.sources[i].next_doc()

    @property
    def epoch(self) -> int:
        """Completed passes over the data: the smallest epoch among the sources."""
        return min(s.epoch for s in self.sources)

    def state(self) -> Dict[str, Any]:
        return {"draws": self.draws, "sources": [s.state() for s in self.sources]}

    def load_state(self, st: Dict[str, Any]) -> None:
        self.draws = int(st["draws"])
        for s, ss in zip(self.sources, st["sources"]):
            s.load_state(ss)
