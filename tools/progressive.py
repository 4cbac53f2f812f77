#!/usr/bin/env python
"""Progressive training: run a config's phases (training.mode layerwise | blockwise | fused) one after another.

    python tools/progressive.py --config configs/progressive_tiny.yaml [--section.key VALUE ...]
    python tools/progressive.py --config X.yaml --deepspeed ds_configs/zero2.json --launcher "deepspeed --num_gpus 2"

Each phase is a normal scripts/train.py run into OUTPUT/phase_k (its config: OUTPUT/phase_k.yaml),
started from the previous phase's export. Rerunning skips finished phases and resumes an interrupted
one from its latest checkpoint. The trained model is OUTPUT/phase_<last>/final. See docs/progressive.md.

SIGUSR1 (a preemption notice) is passed on to the running phase's ranks, which checkpoint and exit 75;
the tool then starts no further phase and exits 75 too (slurm/pretrain.sh requeues the job on that code).
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
    from megamem.config import ConfigError, load_config
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
    parser.add_argument("--check-phases", action="store_true",
                        help="before launching a phase, run scripts/train.py --check on its config in this process's "
                             "environment (what its ranks would refuse, found before they start; slurm/pretrain.sh)")
    args, overrides = parser.parse_known_args(argv)
    if run is None:  # from here on SIGUSR1 is a preemption notice for the running phase
        from megamem.parallel.preemption import LaunchedRuns

        run = LaunchedRuns()
    cfg = load_config(args.config, overrides)
    launcher = shlex.split(args.launcher)
    train = os.path.join(ROOT, "scripts", "train.py")

    ds = ["--deepspeed", args.deepspeed] if args.deepspeed else []

    def command(path):
        return [*launcher, train, "--config", path, *ds]

    def check(path):  # one `error:` line naming the phase's config, as scripts/train.py --check gives it
        done = subprocess.run([sys.executable, train, "--config", path, *ds, "--check"], capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
            why = next((x for x in lines if x.startswith("error: ")), lines[-1]).removeprefix("error: ")
            raise ConfigError(f"{path}: {why}")

    try:
        ran = run_phases(cfg, cfg.training.output_dir, command, run, only=args.phase,
                         check=check if args.check_phases else None,
                         stop_requested=lambda: getattr(run, "noticed", False))
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
