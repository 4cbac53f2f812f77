#!/usr/bin/env python
"""Convert a megamem training output to a Hugging Face model folder.

    python tools/convert_to_hf.py --checkpoint outputs/run/final --output hf/run [--dtype bf16] [--force]

--checkpoint takes an exported folder (output_dir/final) or a DeepSpeed checkpoint
(output_dir/checkpoints, or one stepN folder). Vanilla models become native LlamaForCausalLM
folders that load with AutoModelForCausalLM and no remote code.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import run_cli  # noqa: E402


def main(argv=None) -> int:
    from megamem.hf.convert import DTYPES, convert_to_hf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = p.parse_args(argv)
    print(f"wrote {convert_to_hf(args.checkpoint, args.output, args.dtype, args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
