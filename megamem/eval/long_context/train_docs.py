"""Training documents in the NIAH format, so a model can be taught the task the grid measures.

Each document is a sample of a needle task (the evaluation's own generator, so train and eval share
haystack, needle, question and answer prefix) and its answer, as (question, reply): the reply is the
answer prefix followed by " <value>." — a chat's user and assistant turns, read the way the
evaluation reads a model with a chat template; question + reply is the plain-text form (what
`--chat-template off` reads). Lengths and depths are
drawn uniformly; samples come from a `random.Random` seeded apart from the evaluation's seeds
("train-…" vs "<seed>-<task>-<length>-<depth>"), so evaluated needles are not training needles.
"""
from __future__ import annotations

import random
from typing import Iterator, Optional, Tuple

from ...config import ConfigError
from .tasks import ANSWER, NIAH, Count, make_sample


def answer_text(references) -> str:
    """The answer that follows the prefix "… mentioned in the provided text are"."""
    return " " + ", ".join(references) + "."


def niah_documents(count: Count, num_docs: int, min_length: int, max_length: int, seed: int,
                   task: str = "niah_single_1", haystack: Optional[str] = None) -> Iterator[Tuple[str, str]]:
    """num_docs (question, reply): a prompt of at most L tokens (by `count`; L drawn from min_length..max_length,
    filled with whole haystack sentences, so it may fall one sentence short of L), then its answer."""
    if task not in NIAH:
        raise ConfigError(f"task '{task}'; valid: {', '.join(NIAH)}")
    if not 0 < min_length <= max_length:
        raise ConfigError(f"lengths {min_length}..{max_length}: need 0 < min_length <= max_length")
    rng = random.Random(f"train-{seed}-{task}")
    for _ in range(num_docs):
        length = rng.randint(min_length, max_length)
        sample = make_sample(task, length, count, rng, depth=rng.random(), haystack=haystack)
        question, _, prefix = sample.prompt.partition(ANSWER)
        yield question, prefix + answer_text(sample.references)
