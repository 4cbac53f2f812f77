#!/usr/bin/env python
"""Train a megamem model.

    python scripts/train.py --config configs/tiny_cpu.yaml [--section.key VALUE ...] [--dry-run]

--dry-run prints the resolved config and parameter counts, then exits without touching data.
User errors (bad config, bad override) exit with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import parameter_report, run_cli  # noqa: E402
from megamem.config import dump_config, load_config  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any --section.key VALUE overrides that key of the config.")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print resolved config and parameter counts, then exit")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (see ds_configs/)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        print("# resolved config")
        print(dump_config(cfg))
        print(parameter_report(cfg))
        return 0
    print("error: training is not available in this version of megamem; run with --dry-run", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run_cli(main))
