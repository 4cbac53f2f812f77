#!/usr/bin/env python
"""Train a megamem model.

    python scripts/train.py --config configs/tiny_cpu.yaml [--section.key VALUE ...] [--dry-run]

    deepspeed --num_gpus 2 scripts/train.py --config ... --deepspeed ds_configs/zero3.json
    torchrun --standalone --nproc_per_node 2 scripts/train.py --config ... --deepspeed ds_configs/zero3.json

--dry-run prints the resolved config, parameter counts and the parallel layout, then exits
without touching data.
User errors (bad config, bad override) exit with code 2 and one line on stderr.
A run stopped by SIGUSR1 (a preemption notice) checkpoints and exits with code 75 (EX_TEMPFAIL:
"try again"), on every rank; slurm/pretrain.sh requeues the job on that code and only on that code.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

# A preemption notice that arrives while the run is still starting up (imports, process group,
# model build) is remembered instead of killing the process; the trainer then stops after its first step.
EARLY_STOP = []
if hasattr(signal, "SIGUSR1"):
    signal.signal(signal.SIGUSR1, lambda *_: EARLY_STOP.append(True))
PREEMPTED_EXIT_CODE = 75

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, parameter_report, run_cli  # noqa: E402
from megamem.config import dump_config, load_config  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any --section.key VALUE overrides that key of the config.")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print resolved config and parameter counts, then exit")
    parser.add_argument("--check", action="store_true",
                        help="check everything the run needs (layout at this world size, tokenizer, data, output_dir) "
                             "without training, then exit (slurm/common.sh runs it before srun)")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (see ds_configs/)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return parser.parse_known_args(argv)


def world_size_from_env() -> int:
    from megamem.parallel.distributed import rank_env

    return rank_env()[2]


def dry_run(cfg, ds_path) -> int:
    from megamem.train.ds_config import describe_layout, resolve_ds_config, zero_stage

    world = world_size_from_env()
    ds = resolve_ds_config(ds_path, cfg, world)  # refuses impossible layouts before anything starts
    print("# resolved config")
    print(dump_config(cfg))
    zero3_ranks = world if zero_stage(ds) == 3 and cfg.model.base_model_name is None else 1
    print(parameter_report(cfg, bank_shards=zero3_ranks))
    print("# parallel layout")
    print(describe_layout(ds, world))
    return 0


def train(cfg, ds_path) -> int:
    from megamem.config import ConfigError
    from megamem.data import build_loader, load_tokenizer
    from megamem.parallel.distributed import rank_env
    from megamem.train.trainer import Trainer
    if not cfg.model.tokenizer_name:
        raise ConfigError("model.tokenizer_name is not set: point it at a tokenizer folder "
                          "(python tools/train_tokenizer.py makes one)")
    tokenizer = load_tokenizer(cfg)
    rank, _, world = rank_env()
    if rank == 0:  # from here on a SIGUSR1 is honoured (checkpoint after the next step, exit code 75)
        print(f"training: {world} rank{'s' if world > 1 else ''}, output {cfg.training.output_dir}", flush=True)
    has_eval = True
    try:
        build_loader(cfg, tokenizer, "eval", rank, world).close()
    except ConfigError as e:
        if "no evaluation data" not in str(e):
            raise
        has_eval = False
        if rank == 0:
            print(f"warning: evaluation disabled: {e}", file=sys.stderr)
    extra_eval = None
    if cfg.training.eval_long_context:
        from megamem.eval.during_training import long_context_eval

        extra_eval = long_context_eval(cfg, tokenizer)
    trainer = Trainer(cfg, ds_path, lambda split, r, w: build_loader(cfg, tokenizer, split, r, w),
                      tokenizer=tokenizer, has_eval=has_eval, extra_eval=extra_eval)
    trainer.stop_requested = trainer.stop_requested or bool(EARLY_STOP)
    result = trainer.fit()
    if hasattr(signal, "SIGUSR1"):  # the run is over: a late or repeated notice has nothing left to stop
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # (and SIG_IGN, unlike a handler, outlives interpreter exit)
    if rank == 0:
        ev = result["eval"]
        summary = f"done: {result['steps']} steps"
        if ev:
            summary += f", eval loss {ev['eval_loss']:.4f}, perplexity {ev['eval_ppl']:.2f}"
        if result["preempted"]:
            summary += " (stopped early on a preemption signal; checkpoint saved)"
        print(summary + f"; outputs in {cfg.training.output_dir}")
    return PREEMPTED_EXIT_CODE if result["preempted"] else 0


def check(cfg, ds_path) -> int:
    """What a run would refuse at start-up, found before an allocation is spent: one error line, exit 2."""
    from megamem.data import build_loader, load_tokenizer
    from megamem.train.ds_config import describe_layout, resolve_ds_config
    from megamem.train.run_dir import check_output_dir, describe_run

    world = world_size_from_env()
    ds = resolve_ds_config(ds_path, cfg, world)
    print(f"layout: {describe_layout(ds, world).splitlines()[0]}")
    if cfg.model.base_model_name is None:
        import torch

        from megamem.model import build_model

        with torch.device("meta"):  # every part the config names exists (registries), no memory used
            build_model(cfg)
        print("model: builds")
        tokenizer = load_tokenizer(cfg)
        print(f"tokenizer: {cfg.model.tokenizer_name} ({len(tokenizer)} tokens)")
        if cfg.training.time_step_masking:  # the mask token the masked-denoising objective writes
            from megamem.train.masking import build_objective

            print(f"mask token: {build_objective(cfg, tokenizer, 0).mask_token_id}")
        build_loader(cfg, tokenizer, "train", 0, world).close()
        print("training data: readable")
    check_output_dir(cfg)
    held = describe_run(cfg.training.output_dir) if os.path.isdir(cfg.training.output_dir) else None
    print(f"output_dir: {cfg.training.output_dir} ({'resumes: ' + held if held else 'new run'})")
    print("checks passed")
    return 0


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    from megamem.config import ConfigError
    from megamem.config.progressive import run_problem

    if run_problem(cfg) and not args.dry_run:  # a progressive config runs phase by phase (tools/progressive.py)
        raise ConfigError(run_problem(cfg))
    if args.check:
        return check(cfg, args.deepspeed)
    if args.dry_run:
        return dry_run(cfg, args.deepspeed)
    return train(cfg, args.deepspeed)


if __name__ == "__main__":
    sys.exit(run_cli(main))
