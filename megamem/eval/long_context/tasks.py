"""Long-context samples: needle-in-a-haystack and the RULER synthetic tasks, fitted to a token budget.

Protocols follow RULER (needle "One of the special magic {type} for {key} is: {value}.", prompts that
end with an answer prefix so base models can be scored, multi-key/value/query variants, variable
tracking, common- and frequent-word extraction) and gkamradt's needle test (the needle goes in at a
depth fraction of the haystack's tokens, moved back to the sentence boundary before that point).
Every sample is drawn from `random.Random(seed)`; the haystack grows by whole sentences (or words)
until one more would exceed the budget: prompt + answer prefix ≤ length − max_new_tokens tokens.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ...config import ConfigError
from .haystack import haystack_sentences, random_key, random_value

Count = Callable[[str], int]  # text → number of tokens
ANSWER = "\x1e"  # in a prompt, between the question and the answer prefix (a chat model's reply starts there)


@dataclass
class Sample:
    task: str
    length: int  # the token budget the sample was fitted to
    prompt: str  # everything the model reads, ending with the answer prefix
    references: List[str]  # what a correct answer contains
    metric: str = "string_match_all"
    depth: Optional[float] = None  # niah: where the needle is, as a fraction of the haystack's tokens
    needle_positions: List[int] = field(default_factory=list)  # sentence indices of the inserted needles


# RULER's task table: haystack, key kind, value kind, needles (keys x values), queries
NIAH = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("corpus", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("corpus", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("corpus", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needles", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needles", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("corpus", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("corpus", "words", "numbers", 4, 1, 4),
}
OTHER = ("vt", "cwe", "fwe")
TASKS = tuple(NIAH) + OTHER


def _fit(build: Callable[[int], Tuple[str, object]], count: Count, budget: int, what: str) -> Tuple[str, object]:
    """The largest n (binary search) whose build(n) prompt fits the budget."""
    lo, hi = 0, 1
    while count(build(hi)[0]) <= budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 22:
            break
    if count(build(lo)[0]) > budget:
        raise ConfigError(f"{what}: a budget of {budget} tokens cannot hold even the question; use a longer length")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(build(mid)[0]) <= budget else (lo, mid)
    return build(lo)


def _insert(sentences: List[str], needles: Sequence[str], depths: Sequence[float], count: Count,
            known: Dict[str, int]) -> Tuple[str, List[int]]:
    """Each needle before the first sentence starting at or after depth × the haystack's tokens (a sentence
    boundary at or before that point); depth 1 appends. Returns the text and the needles' sentence indices."""
    for s in set(sentences) - known.keys():  # known: token counts kept across one sample's fitting steps
        known[s] = count(s) + 1  # + the joining space
    sizes = [known[s] for s in sentences]
    total = sum(sizes)
    starts, acc = [], 0
    for size in sizes:
        starts.append(acc)
        acc += size
    where = []
    for d in depths:
        target = d * total
        where.append(max([i for i, s in enumerate(starts) if s <= target] or [0]) if d < 1 else len(sentences))
    out, positions = list(sentences), []
    for needle, i in sorted(zip(needles, where), key=lambda p: p[1], reverse=True):
        out.insert(i, needle)
    for needle in needles:
        positions.append(out.index(needle))
    return " ".join(out), positions


def niah_sample(task: str, length: int, count: Count, rng: random.Random, depth: Optional[float] = None,
                haystack: Optional[str] = None) -> Sample:
    source, key_kind, value_kind, num_keys, num_values, num_queries = NIAH[task]
    source = haystack or source
    keys = []
    while len(keys) < num_keys:  # distinct keys
        k = random_key(rng) if key_kind == "words" else random_value(rng, key_kind)
        keys.append(k) if k not in keys else None
    values = [[random_value(rng, value_kind) for _ in range(num_values)] for _ in keys]
    kind = {"numbers": "numbers", "words": "words", "uuids": "uuids"}[value_kind]
    needles = [f"One of the special magic {kind} for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    queried = keys[:num_queries]
    refs = [v for k, vs in zip(keys, values) if k in queried for v in vs]
    depths = [depth] * len(needles) if depth is not None else [rng.random() for _ in needles]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + " and " + queried[-1]
    head = (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n")
    tail = (f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text?{ANSWER} "
            f"The special magic {kind} for {query} mentioned in the provided text are")
    distractor_rng = random.Random(rng.random())
    known: Dict[str, int] = {}

    def build(n: int):
        if source == "needles":  # the haystack is other needles of the same form
            r = random.Random(distractor_rng.random())
            sentences = []
            while len(sentences) < n:
                k = random_key(r) if key_kind == "words" else random_value(r, key_kind)
                if k not in keys:
                    sentences.append(f"One of the special magic {kind} for {k} is: {random_value(r, value_kind)}.")
        else:
            sentences = haystack_sentences(source, n)
        text, positions = _insert(sentences, needles, depths, count, known)
        return head + text + tail, positions

    prompt, positions = _fit(build, count, length, task)
    return Sample(task, length, prompt, refs, depth=depth, needle_positions=positions)


def _var(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def vt_sample(length: int, count: Count, rng: random.Random, hops: int = 4) -> Sample:
    """Variable tracking: one chain VAR X1 = value, VAR X2 = VAR X1, …; name every variable holding value."""
    names: List[str] = []
    while len(names) < hops + 1:
        v = _var(rng)
        names.append(v) if v not in names else None
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in chain)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above.{ANSWER} Answer: "
            f"According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
            f"assigned the value {value}, they are:")
    known: Dict[str, int] = {}

    def build(n: int):
        text, positions = _insert(haystack_sentences("noise", n), chain, depths, count, known)
        return head + text + tail, positions

    prompt, positions = _fit(build, count, length, "vt")
    return Sample("vt", length, prompt, names, needle_positions=positions)


def cwe_sample(length: int, count: Count, rng: random.Random, num_common: int = 10) -> Sample:
    """Common-word extraction: num_common words repeated freq_common times among words seen freq_rare times.
    freq_common starts at 30 (rare: 3) and is lowered for budgets too small to hold it."""
    words = rng.sample(sorted({random_key(rng).replace("-", "") for _ in range(4000)}), 1500)
    common, rare = words[:num_common], words[num_common:]
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    tail = (f"\nQuestion: What are the {num_common} most common words in the above list?{ANSWER} Answer: The top "
            f"{num_common} words that appear most often in the list are:")
    shuffle_seed = rng.random()
    for freq_common, freq_rare in ((30, 3), (20, 3), (10, 2), (6, 2), (4, 1)):
        def build(n: int, fc=freq_common, fr=freq_rare):
            items = common * fc + rare[:n] * fr
            random.Random(shuffle_seed).shuffle(items)
            return head + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + tail, None
        try:
            prompt, _ = _fit(build, count, length, "cwe")
        except ConfigError:
            continue
        return Sample("cwe", length, prompt, list(common))
    raise ConfigError(f"cwe: a budget of {length} tokens cannot hold {num_common} words 4 times each; use a "
                      "longer length")


def fwe_sample(length: int, count: Count, rng: random.Random, alpha: float = 2.0, vocab: int = 800) -> Sample:
    """Frequent-word extraction: coded words drawn from a Zipf(alpha) law; the three most frequent ones."""
    codes: List[str] = []
    while len(codes) < vocab:
        c = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        codes.append(c) if c not in codes else None
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
    stream = rng.choices(codes, weights=weights, k=1 << 16)
    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ")
    tail = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            f"frequently appeared words in the above coded text?{ANSWER} Answer: According to the coded text above, "
            "the three most frequently appeared words are:")
    counts: Dict[str, int] = {}

    def build(n: int):
        return head + " .... ".join(stream[:n]) + tail, n

    prompt, n = _fit(build, count, length, "fwe")
    for w in stream[:n]:
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) < 4 or ranked[2][1] == ranked[3][1]:
        raise ConfigError(f"fwe: {length} tokens hold too few words for a clear top three; use a longer length")
    return Sample("fwe", length, prompt, [w for w, _ in ranked[:3]])


def make_sample(task: str, length: int, count: Count, rng: random.Random, depth: Optional[float] = None,
                haystack: Optional[str] = None) -> Sample:
    if task in NIAH:
        return niah_sample(task, length, count, rng, depth, haystack)
    if task == "vt":
        return vt_sample(length, count, rng)
    if task == "cwe":
        return cwe_sample(length, count, rng)
    if task == "fwe":
        return fwe_sample(length, count, rng)
    raise ConfigError(f"long-context task '{task}'; valid: {', '.join(TASKS)}")
