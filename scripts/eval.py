#!/usr/bin/env python
"""Evaluate a trained megamem model: perplexity, chapter usage, lm-eval benchmarks.

    python scripts/eval.py --model outputs/run/final                       # perplexity on the run's eval split
    python scripts/eval.py --model hf/run --config configs/x.yaml --training.eval_split test --max-batches 50
    python scripts/eval.py --model hf/run --lm-eval-tasks arc_easy,hellaswag --lm-eval-limit 200
    python scripts/eval.py --model outputs/run/final --ablate-memory --max-batches 50   # is the memory used?

--model: output_dir/final, a checkpoint, or a Hugging Face folder. The data comes from the model's
config.yaml (exports and checkpoints) or --config, with dotted overrides (--data.x / --training.x).
Chapter models also report how reads spread over chapters, and plot it (--plot).
--ablate-memory: eval loss with the memory on, each memory layer off, all off, and each bank
replaced by its mean row (megamem.eval.ablation; docs/diagnostics.md).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402
from megamem.config import ConfigError  # noqa: E402


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--config", help="megamem YAML with the data to evaluate on (default: the model's config.yaml)")
    p.add_argument("--split", choices=["eval", "train"], default="eval",
                   help="eval: training.eval_split (or data.shards/validation); train: training.dataset_split")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (default: the whole split)")
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument("--ablate-memory", action="store_true",
                   help="eval loss with memory on, each memory layer off, all off, and banks replaced by their mean row")
    p.add_argument("--routing-strategy", choices=["sequence", "rolling", "token"])
    p.add_argument("--plot", help="chapter-usage plot (PNG); default <output>.png when --output is given")
    p.add_argument("--output", help="write the results as JSON here too")
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks (Hugging Face folders)")
    p.add_argument("--lm-eval-limit", type=int, help="examples per task")
    p.add_argument("--lm-eval-batch-size", type=int, default=1)
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --data.eval_split=test)")
    return args, overrides


def data_config(args, overrides, loaded):
    """The run's own config (export: config.yaml; checkpoint: the one saved with it), or --config."""
    from megamem.config import apply_overrides, load_config, parse_overrides

    if args.config is not None:
        return load_config(args.config, overrides)
    if os.path.isfile(os.path.join(args.model, "config.yaml")):
        return load_config(os.path.join(args.model, "config.yaml"), overrides)
    if loaded.cfg is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        apply_overrides(loaded.cfg, parse_overrides(overrides))  # a checkpoint
        return loaded.cfg
    raise ConfigError(f"{args.model} has no config.yaml saying which data to evaluate on; pass --config FILE")


def ablation(args, overrides):
    """The memory's contribution: one row per setting, printed as a table."""
    import torch

    from megamem.eval import load_any
    from megamem.eval.ablation import ablate_memory, ablation_table, check_has_memory

    loaded = load_any(args.model, torch.float32, args.routing_strategy)
    check_has_memory(loaded.megamem)
    if loaded.tokenizer is None:
        raise ConfigError(f"{args.model}: no tokenizer saved with the model")
    rows = ablate_memory(loaded, data_config(args, overrides, loaded), args.split, args.max_batches)
    print(ablation_table(rows))
    return rows


def main(argv=None) -> int:
    import torch

    from megamem.eval import load_any, perplexity
    from megamem.eval.chapter_stats import plot_usage, usage_summary

    args, overrides = parse_args(argv)
    if args.max_batches is not None and args.max_batches < 1:
        raise ConfigError(f"--max-batches {args.max_batches}: evaluate at least 1 batch (or leave it out for the "
                          "whole split)")
    results = {"model": args.model}
    if args.ablate_memory:
        results["ablate_memory"] = ablation(args, overrides)
    if not args.no_perplexity:
        loaded = load_any(args.model, torch.float32, args.routing_strategy)
        if loaded.tokenizer is None:
            raise ConfigError(f"{args.model}: no tokenizer saved with the model")
        cfg = data_config(args, overrides, loaded)
        ppl = perplexity(loaded, cfg, args.split, args.max_batches)
        usage = ppl.pop("chapter_usage")
        results["perplexity"] = {"split": args.split, **ppl}
        print(f"{args.split}: loss {ppl['loss']:.4f}  perplexity {ppl['ppl']:.2f}  over {ppl['tokens']} tokens")
        if usage:
            results["chapter_usage"] = {str(k): v for k, v in usage_summary(usage).items()}
            for layer, s in usage_summary(usage).items():
                print(f"chapters, layer {layer}: normalised entropy {s['normalised_entropy']:.3f}, max share "
                      f"{s['max_share']:.3f}, unused {s['unused']}/{len(s['shares'])}")
            plot = args.plot or (os.path.splitext(args.output)[0] + ".png" if args.output else None)
            if plot:
                results["chapter_plot"] = plot_usage(usage, plot)
                print(f"wrote {plot}")
    if args.lm_eval_tasks:
        from megamem.eval.lm_eval_glue import run_lm_eval

        tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
        results["lm_eval"] = run_lm_eval(args.model, tasks, args.lm_eval_limit, args.lm_eval_batch_size)
        for task, metrics in results["lm_eval"].items():
            print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
