"""Small helpers the config validators share: each appends one line per problem."""
from __future__ import annotations

from typing import List


def _positive(problems: List[str], section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            problems.append(f"{section}.{name} must be > 0, got {value}")


def _fraction(problems: List[str], section: str, obj, *names: str, closed: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
        if value is not None and not ok:
            problems.append(f"{section}.{name} must be in [0, 1{']' if closed else ')'}, got {value}")
