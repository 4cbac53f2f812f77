"""Haystack text and random needle material for long-context tasks, offline and seeded.

Sources: `noise` (the repeated filler sentences of RULER's noise haystack), `corpus` (the embedded
King James Bible, sentences in order), or a local text file (its sentences in order). Keys are
adjective-noun pairs; values are 7-digit numbers, words or UUIDs — drawn from a `random.Random`, so
a seed gives the same samples everywhere.
"""
from __future__ import annotations

import os
import random
import re
import uuid
from typing import List

from ...config import ConfigError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

ADJECTIVES = ("able ancient angry bright broad calm careful cheap clean clever cold cool crisp curly damp dark "
              "deep dense dry dull eager early empty equal faint fair fancy fast fierce flat fond fresh full "
              "gentle giant glad grand great green happy hard heavy hollow huge humble icy jolly keen kind large "
              "late lazy light little lively long loud lucky mad mild minor modern narrow neat noble odd old "
              "pale plain polite proud quick quiet rapid rare raw rich rough round rural sad safe sharp shiny "
              "short shy silent simple slim slow small smooth soft solid sour spare stark steep stiff still "
              "strong sunny sweet swift tall tame tender thick thin tidy tiny tough urban vast warm weak wet "
              "wide wild wise young").split()
NOUNS = ("anchor apple arrow badge basket beacon bell blanket bottle bridge brush bucket cabin camera candle "
         "canvas carpet castle cellar chair chimney circle cloud coin comet compass copper cradle crown "
         "crystal curtain desk diamond dragon drum eagle engine falcon feather fence field flame flute forest "
         "fountain garden glacier globe hammer harbor helmet hill island jacket jewel kettle kite ladder "
         "lantern lemon letter lion magnet mango marble meadow mirror monkey needle ocean orchard owl palace "
         "panda pencil pepper piano pillow planet pocket pond puzzle rabbit radio river rocket saddle sail "
         "shadow shell signal silver sparrow spider spoon statue stone storm sugar table teapot temple thunder "
         "tiger tower trumpet tunnel valley violin wagon wallet whistle window winter wizard wolf").split()


def random_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return random_key(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"value kind {kind!r}")


def split_sentences(text: str) -> List[str]:
    """Sentences (ending in . ! or ?), whitespace collapsed; the last fragment kept if it has no end mark."""
    text = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def haystack_sentences(source: str, needed: int) -> List[str]:
    """At least `needed` sentences from the source, repeated from the start when it runs out."""
    if source == "noise":
        base = split_sentences(NOISE)
    elif source == "corpus":
        base = _corpus_sentences()
    elif os.path.isfile(source):
        with open(source, encoding="utf-8", errors="replace") as f:
            base = split_sentences(f.read())
        if not base:
            raise ConfigError(f"haystack file {source} holds no sentences")
    else:
        raise ConfigError(f"haystack '{source}': use noise, corpus (the embedded KJV text) or a local text file")
    reps = -(-needed // len(base))
    return (base * max(reps, 1))[:max(needed, 0)]


_CORPUS: List[str] = []


def _corpus_sentences() -> List[str]:
    if not _CORPUS:
        from ...data.corpus import kjv_chapters

        for chapter in kjv_chapters():
            _CORPUS.extend(split_sentences(str(chapter["text"])))
            if len(_CORPUS) > 200_000:
                break
    return _CORPUS
