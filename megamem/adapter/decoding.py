"""The memory state of one HF generate() on an adapter model, owned by megamem.

HF generate() drives the base model and hands it its own KV cache; how it names that cache changes
between transformers releases (`past_key_values`, then `cache`). megamem therefore never looks at
keyword names: a generation is opened by `AdapterModel.decoding()` (which `AdapterModel.generate`
uses), the HF cache is recognised by its type, and the memory state (banks, memory K/V, chapter
routing) lives in a `DecodingState` that megamem creates and clears. A cached decoding step that
finds no open generation is refused instead of silently recomputing memory or re-routing chapters.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

from ..model.decoding_cache import DecodingCache


class DecodingStateError(RuntimeError):
    """A cached decoding step of a memory adapter ran without megamem's decoding state."""


def find_hf_cache(*containers: Iterable[Any]) -> Optional[Any]:
    """The transformers Cache among the given values (positional args, keyword values), by type."""
    from transformers.cache_utils import Cache

    for values in containers:
        for value in values:
            if isinstance(value, Cache):
                return value
    return None


class DecodingState(DecodingCache):
    """The memory state of one generation (per-layer memory K/V and routing; HF keeps the self-attention
    K/V), bound to the HF cache object of that generation."""

    def __init__(self):
        super().__init__()
        self._owner = None  # weakref to the HF cache of the generation in progress

    def step(self, hf_cache) -> None:
        """Called before every forward of the base: start a new generation on a fresh HF cache, else
        check that the HF cache and this state have seen the same tokens."""
        past = hf_cache.get_seq_length()
        if past == 0 or self._owner is None or self._owner() is not hf_cache:
            if past != 0:
                raise DecodingStateError(
                    f"memory adapter: an HF cache already holding {past} tokens was not started inside this "
                    "decoding() context; start the generation (its prompt) inside `with model.decoding():`")
            DecodingCache.__init__(self)  # a new generation: banks, memory K/V and routing start afresh
            self._owner = weakref.ref(hf_cache)
        self.length = past


def refuse_stateless_decoding(past: int) -> None:
    raise DecodingStateError(
        f"memory adapter: a cached decoding step (the HF cache holds {past} tokens) ran outside megamem's "
        "decoding state, so memory K/V and chapter routing would be recomputed per token; call "
        "model.generate(...), or wrap model.base.generate(...) in `with model.decoding():`")
