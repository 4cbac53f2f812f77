"""A seeded synthetic knowledge corpus: made-up people, two attributes each, stated among filler.

Every word of the corpus is one token of a word-level tokenizer built from the corpus's own
vocabulary (`word_tokenizer`), so an attribute is one token and recall is exact. Names are two
made-up words (a first name and a family name, both shared by many people), so a fact is bound
to the pair, not to either word; attribute values are made-up words drawn uniformly (chance =
1 / number of values). Each fact is stated `repeats` times, in templates drawn at random, among
filler sentences that carry no facts. Recall prompts are a template's words up to the value.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr", "gr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "n", "r", "s", "l", "x", "th"]

# the attribute, then its templates: a fact's statement ends with its value (then " .")
ATTRIBUTES: Dict[str, List[str]] = {
    "city": ["{name} lives in {value} .", "the home of {name} is {value} .", "{name} was born in {value} .",
             "people say that {name} comes from {value} ."],
    "job": ["{name} works as a {value} .", "the job of {name} is {value} .", "{name} earns a living as a {value} .",
            "by trade {name} is a {value} ."],
}
FILLER = ("the river ran slow under a grey sky and the wind moved over the fields while birds sang "
          "in the old trees near the road where carts passed each day bringing bread and salt to the market "
          "a dog slept by the door of a small house and the bells rang at noon").split()


def made_up_words(count: int, rng: random.Random, syllables: int, taken: set) -> List[str]:
    """`count` distinct pronounceable words not in `taken` (which they are added to)."""
    words: List[str] = []
    while len(words) < count:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


@dataclass(frozen=True)
class Fact:
    name: str
    attribute: str
    value: str


@dataclass
class KnowledgeBase:
    """people × attributes → values, all seeded by `seed`."""

    facts: List[Fact]
    values: Dict[str, List[str]]
    vocabulary: List[str]

    @classmethod
    def build(cls, people: int, values_per_attribute: int = 100, seed: int = 0) -> "KnowledgeBase":
        if people < 1 or values_per_attribute < 2:
            raise ValueError("people must be ≥ 1 and values_per_attribute ≥ 2")
        rng, taken = random.Random(seed), set(FILLER)
        for template in (t for ts in ATTRIBUTES.values() for t in ts):
            taken.update(w for w in template.split() if not w.startswith("{"))
        side = max(8, int((2 * people) ** 0.5) + 1)  # first × family names: about half the pairs are people
        firsts, families = made_up_words(side, rng, 2, taken), made_up_words(side, rng, 2, taken)
        pairs = rng.sample([(a, b) for a in firsts for b in families], people)
        values = {a: made_up_words(values_per_attribute, rng, 3, taken) for a in ATTRIBUTES}
        facts = [Fact(f"{a} {b}", attr, rng.choice(values[attr])) for a, b in pairs for attr in ATTRIBUTES]
        return cls(facts, values, sorted(taken))

    def statement(self, fact: Fact, rng: random.Random) -> str:
        return rng.choice(ATTRIBUTES[fact.attribute]).format(name=fact.name, value=fact.value)

    def prompts(self) -> Iterator[Tuple[str, str]]:
        """(prompt, value) for every fact and template: the template's words up to the value."""
        for fact in self.facts:
            for template in ATTRIBUTES[fact.attribute]:
                yield template.split("{value}")[0].format(name=fact.name).strip(), fact.value


def filler_sentence(rng: random.Random) -> str:
    start = rng.randrange(len(FILLER) - 12)
    return " ".join(FILLER[start:start + rng.randint(6, 12)]) + " ."


def documents(kb: KnowledgeBase, repeats: int, facts_per_doc: int, filler_per_fact: float, seed: int) -> List[str]:
    """Every fact stated `repeats` times over the documents, `facts_per_doc` statements a document, shuffled
    among about filler_per_fact filler sentences per statement."""
    rng = random.Random(seed)
    statements = [kb.statement(f, rng) for f in kb.facts for _ in range(repeats)]
    rng.shuffle(statements)
    docs = []
    for i in range(0, len(statements), facts_per_doc):
        part = statements[i:i + facts_per_doc]
        part += [filler_sentence(rng) for _ in range(round(filler_per_fact * len(part)))]
        rng.shuffle(part)
        docs.append(" ".join(part))
    return docs
