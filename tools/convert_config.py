#!/usr/bin/env python
"""Rewrite a config of the PEER + MLA, long-context or Stack-Wise trainer as a megamem YAML.

    python tools/convert_config.py SOURCE.yaml --output configs/mine.yaml
    python tools/convert_config.py SOURCE.yaml --output mine.yaml --drop eval_config wandb_config.entity

Every source key maps to a megamem key or is refused (exit 2, one line listing each such key and what
to use instead); --drop leaves keys out on purpose (a dotted key, a section, or a glob). The result
is validated as a megamem config before it is written (atomically).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402


def main(argv=None) -> int:
    import yaml

    from megamem.config import ConfigError, config_from_dict, validate
    from megamem.config.load import read_yaml
    from megamem.config.migrate import migrate

    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the source trainer's YAML")
    ap.add_argument("--output", required=True, help="where to write the megamem YAML")
    ap.add_argument("--drop", nargs="+", default=[], help="source keys to leave out on purpose (dotted, or a glob)")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.source):
        raise ConfigError(f"{args.source}: no such file")
    if os.path.exists(args.output):
        raise ConfigError(f"--output {args.output} exists; choose a new file")
    layout, data, problems, notes = migrate(read_yaml(args.source), args.drop)
    if problems:
        raise ConfigError(f"{args.source}: " + "; ".join(problems) + " (or leave such keys out with --drop KEY)")
    cfg = config_from_dict(data, f"{args.source} as megamem")
    found = validate(cfg)
    if found:
        raise ConfigError(f"{args.source} converts to an invalid megamem config: " + "; ".join(found))
    tmp = f"{args.output}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# converted from {os.path.basename(args.source)} ({layout} layout) by tools/convert_config.py\n")
        f.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    os.replace(tmp, args.output)
    print(f"{args.source} ({layout} layout) -> {args.output}")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
