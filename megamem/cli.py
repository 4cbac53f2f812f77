"""Shared pieces of the command-line scripts: user-error handling and the parameter report."""
from __future__ import annotations

import sys
from typing import Callable

import torch

from .config import ConfigError, MegamemConfig


def run_cli(main: Callable[[], int]) -> int:
    """Run a script's main; a user error becomes one line on stderr and exit code 2, no traceback."""
    try:
        return main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def parameter_report(cfg: MegamemConfig) -> str:
    """Parameter counts of the model a config describes, built on the meta device (no memory, instant)."""
    from .model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    counts = model.parameter_counts()
    lines = ["# parameters",
             f"total:     {counts['total']:>14,}  ({_fmt(counts['total'])})",
             f"memory:    {counts['memory']:>14,}  ({_fmt(counts['memory'])})",
             f"trainable: {counts['trainable']:>14,}  ({_fmt(counts['trainable'])})",
             f"memory layers: {model.memory_layers or 'none'}"]
    for i, bank in enumerate(counts["banks"]):
        lines.append(f"bank {i}: {bank['kind']}, {bank['tokens']} tokens x {bank['dim']}, "
                     f"{bank['parameters']:,} parameters, {_fmt(bank['bytes'])} bytes, layers {bank['layers']}")
    return "\n".join(lines)
