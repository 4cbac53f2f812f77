#!/usr/bin/env python
"""Generate text with a trained megamem model.

    python scripts/inference.py --model outputs/run/final --prompt "In the beginning" [--max-new-tokens 64]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import run_cli  # noqa: E402
from megamem.config import ConfigError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported folder (outputs/<run>/final)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from megamem.train.export import load_exported

    args = parse_args(argv)
    model, cfg, tokenizer = load_exported(args.model, torch.float32)
    if tokenizer is None:
        raise ConfigError(f"{args.model}: no tokenizer/ folder; cannot turn the prompt into tokens")
    ids = torch.tensor([tokenizer.encode(args.prompt, add_special_tokens=False)])
    if ids.shape[1] == 0:
        raise ConfigError("--prompt is empty")
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=cfg.model.eos_token_id, generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
