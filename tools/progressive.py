#!/usr/bin/env python
"""Progressive training: run a config's phases (training.mode layerwise | blockwise | fused) one after another.

    python tools/progressive.py --config configs/progressive_tiny.yaml [--section.key VALUE ...]
    python tools/progressive.py --config X.yaml --deepspeed ds_configs/zero2.json --launcher "deepspeed --num_gpus 2"

Each phase is a normal scripts/train.py run into OUTPUT/phase_k (its config: OUTPUT/phase_k.yaml),
started from the previous phase's export. Rerunning skips finished phases and resumes an interrupted
one from its latest checkpoint. The trained model is OUTPUT/phase_<last>/final. See docs/progressive.md.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megamem.cli import ArgumentParser, run_cli  # noqa: E402


def main(argv=None, run=None) -> int:
    from megamem.config import load_config
    from megamem.folders import write_json_file
    from megamem.eval.phase_curves import format_table, phase_summaries, plot_phases
    from megamem.train.progressive import PREEMPTED, PhasePreempted, phase_dir, run_phases

    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Any --section.key VALUE overrides that key of the config (every phase).")
    parser.add_argument("--config", required=True, help="YAML config with training.mode layerwise/blockwise/fused")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON for every phase (see ds_configs/)")
    parser.add_argument("--launcher", default=shlex.quote(sys.executable),
                        help="command that starts scripts/train.py (default: this Python; e.g. 'deepspeed --num_gpus 2')")
    parser.add_argument("--phase", type=int, default=None, help="run only this phase (earlier ones must be finished)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    launcher = shlex.split(args.launcher)
    train = os.path.join(ROOT, "scripts", "train.py")

    def command(path):
        return [*launcher, train, "--config", path, *(["--deepspeed", args.deepspeed] if args.deepspeed else [])]

    run = run or (lambda cmd: subprocess.run(cmd).returncode)
    try:
        ran = run_phases(cfg, cfg.training.output_dir, command, run, only=args.phase)
    except PhasePreempted as stop:
        print(f"progressive: {stop}", file=sys.stderr)
        return PREEMPTED  # as scripts/train.py: a requeueing job script tells a preemption from a failure
    last = phase_dir(cfg, (cfg.training.total_blocks or cfg.model.num_layers) - 1)
    print(f"progressive: ran phases {ran or 'none (all finished)'}; the trained model: {last}/final")
    summaries = phase_summaries(cfg)
    if summaries:  # the schedule so far, on one token axis
        out = cfg.training.output_dir
        print(format_table(summaries))
        write_json_file(os.path.join(out, "phases.json"), summaries)
        plot_phases(summaries, os.path.join(out, "phases.png"), f"{cfg.training.mode} training: loss by phase")
        print(f"progressive: per-phase results {out}/phases.json, loss curve {out}/phases.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
