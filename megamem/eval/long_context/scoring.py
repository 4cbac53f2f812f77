"""RULER's scores and the effective length.

string_match_all: per sample, the fraction of references found (case-insensitive substring) in the
prediction; string_match_part: per sample, 1 if any reference is found. Both averaged × 100.
Effective length: the largest evaluated length such that it and every shorter evaluated length score
at least the threshold (85.6 by default: Llama-2-7B's score at 4k, the bar RULER sets).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

EFFECTIVE_THRESHOLD = 85.6


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    scores = [sum(r.lower() in p.lower() for r in refs) / len(refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    scores = [max(float(r.lower() in p.lower()) for r in refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def effective_length(score_by_length: Dict[int, float], threshold: float = EFFECTIVE_THRESHOLD) -> Optional[int]:
    best = None
    for length in sorted(score_by_length):
        if score_by_length[length] < threshold:
            break
        best = length
    return best


def averages(per_task: Dict[str, Dict[int, float]]) -> Dict[int, float]:
    """Mean over tasks per length (lengths every task was evaluated at)."""
    lengths: List[int] = sorted(set.intersection(*(set(v) for v in per_task.values()))) if per_task else []
    return {n: sum(v[n] for v in per_task.values()) / len(per_task) for n in lengths}
