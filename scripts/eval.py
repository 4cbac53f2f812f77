#!/usr/bin/env python
"""Evaluate a trained model: perplexity, chapter usage, long-context tasks (NIAH, RULER), lm-eval benchmarks,
memory and throughput per context length (--benchmarks profile).

    python scripts/eval.py --model outputs/run/final                       # perplexity on the run's eval split
    python scripts/eval.py --model hf/run --config configs/x.yaml --training.eval_split test --max-batches 50
    python scripts/eval.py --model outputs/run/final --benchmarks niah ruler --niah-lengths 1024 2048 \
        --niah-depths 0.1 0.5 0.9 --output results.json                   # JSON, heatmap and plot beside it
    python scripts/eval.py --model outputs/run/final --no-perplexity --lm-eval-tasks megamem_mc   # shipped, offline
    python scripts/eval.py --model hf/run --lm-eval-tasks my_task.yaml,hellaswag --lm-eval-limit 200
    python scripts/eval.py --model outputs/run/final --ablate-memory --max-batches 50   # is the memory used?

Every key of the config's `evaluation:` section is also a flag named after it (--niah-lengths,
--ruler-tasks, --max-new-tokens, ...); flags win over the config.

--model: output_dir/final, a checkpoint, or a Hugging Face folder. The data comes from the model's
config.yaml (exports and checkpoints) or --config, with dotted overrides (--data.x / --training.x).
Chapter models also report how reads spread over chapters, and plot it (--plot); PEER models how
selections spread over experts (--expert-plot).
--ablate-memory: eval loss with the memory on, each memory layer off, all off, and each bank
replaced by its mean row (megamem.eval.ablation; docs/diagnostics.md).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402
from megamem.folders import write_json_file  # noqa: E402
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
    p.add_argument("--expert-plot", help="PEER expert-usage plot (PNG); default <output>_experts.png with --output")
    p.add_argument("--output", help="write the results as JSON here too")
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks: megamem_mc (shipped), "
                   "a task YAML with local data, or a registry name (data from the hub)")
    p.add_argument("--lm-eval-limit", type=int, help="examples per task")
    p.add_argument("--lm-eval-batch-size", type=int, help="lm-eval batch size (default: evaluation.eval_batch_size)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let lm-eval run the code of an HF folder megamem did not write (megamem's own always load)")
    add_evaluation_flags(p)
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --data.eval_split=test)")
    return args, overrides


ABLATION_KEYS = ("ablation_mode", "ablation_values")  # tools/ablate.py's, not flags here


def add_evaluation_flags(p) -> None:
    """One flag per evaluation key (evaluation.niah_lengths → --niah-lengths), typed from the schema."""
    import dataclasses
    import typing

    from megamem.config import EvaluationConfig

    hints = typing.get_type_hints(EvaluationConfig)
    for f in dataclasses.fields(EvaluationConfig):
        if f.name in ABLATION_KEYS:
            continue
        flag, tp = "--" + f.name.replace("_", "-"), hints[f.name]
        if typing.get_origin(tp) is typing.Union:  # Optional[X] → X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        inner = tp
        many = typing.get_origin(inner) in (list, typing.List)
        item = typing.get_args(inner)[0] if many else inner
        choices = list(typing.get_args(item)) if typing.get_origin(item) is typing.Literal else None
        kind = type(choices[0]) if choices else item
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, dest=f"eval_{f.name}", help=f"evaluation.{f.name}")
        else:
            p.add_argument(flag, type=kind, nargs="+" if many else None, choices=choices, default=None,
                           dest=f"eval_{f.name}", help=f"evaluation.{f.name}")


def evaluation_config(args, overrides, cfg=None):
    """The evaluation section: the given/saved config's, then the flags; validated."""
    import dataclasses

    from megamem.config import EvaluationConfig, MegamemConfig, validate

    base = cfg if cfg is not None else MegamemConfig()
    section = dataclasses.replace(getattr(base, "evaluation", None) or EvaluationConfig())
    for f in dataclasses.fields(section):
        value = getattr(args, f"eval_{f.name}", None)
        if value is not None:
            setattr(section, f.name, value)
    if args.lm_eval_tasks:
        section.evals = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
        if "lm_eval" not in section.benchmarks:
            section.benchmarks = [*section.benchmarks, "lm_eval"]
    if args.no_perplexity:
        section.benchmarks = [b for b in section.benchmarks if b != "perplexity"]
    problems = [p for p in validate(dataclasses.replace(MegamemConfig(), evaluation=section))
                if p.startswith("evaluation.")]
    if problems:
        raise ConfigError("; ".join(problems))
    return section


def evaluation_source(args, overrides):
    """The config whose evaluation section applies: --config, else the model folder's config.yaml."""
    from megamem.config import load_config

    if args.config is not None:
        return load_config(args.config, overrides)
    if os.path.isfile(os.path.join(args.model, "config.yaml")):
        return load_config(os.path.join(args.model, "config.yaml"), overrides)
    return None


def long_context(args, ev, loaded, results) -> None:
    from megamem.eval.long_context import plot_niah, plot_ruler, ruler_lengths, run_niah, run_ruler, text_model

    model = text_model(loaded, ev.max_new_tokens, ev.chat_template, ev.temperature, ev.top_k, ev.top_p,
                       ev.do_sample)
    stem = os.path.splitext(args.output)[0] if args.output else None
    if "niah" in ev.benchmarks:
        niah = run_niah(model, ev.niah_lengths, ev.niah_depths, ev.num_samples, ev.seed, ev.max_new_tokens,
                        ev.niah_task, ev.haystack, ev.metrics)
        results["niah"] = niah
        for n, row in niah["grid"].items():
            print(f"niah {n} tokens: " + "  ".join(f"depth {float(d):.2f}: {v:.1f}" for d, v in row.items()))
        if stem:
            niah["plot"] = plot_niah(niah, stem + "_niah.png")
            print(f"wrote {niah['plot']}")
    if "ruler" in ev.benchmarks:
        lengths = ev.ruler_lengths or ruler_lengths(ev.ruler_max_length)
        ruler = run_ruler(model, ev.ruler_tasks, lengths, ev.num_samples, ev.seed, ev.max_new_tokens, ev.metrics,
                          ev.effective_threshold)
        results["ruler"] = ruler
        for task, row in ruler["scores"].items():
            print(f"ruler {task}: " + "  ".join(f"{n}: {v:.1f}" for n, v in row.items()))
        print("ruler average: " + "  ".join(f"{n}: {v:.1f}" for n, v in ruler["average"].items()) +
              f"; effective length {ruler['effective_length']} (threshold {ruler['threshold']})")
        if stem:
            ruler["plot"] = plot_ruler(ruler, stem + "_ruler.png")
            print(f"wrote {ruler['plot']}")


def profile(args, ev, loaded, results) -> None:
    from megamem.eval.profile import plot_profile, profile_model

    import torch

    model = loaded.megamem.to("cuda") if torch.cuda.is_available() and loaded.megamem is not None else loaded.megamem
    res = profile_model(model, ev.profile_lengths, ev.profile_decode_tokens, ev.seed)
    results["profile"] = res
    for n, r in res["lengths"].items():
        print(f"profile {n} tokens: prefill {r['prefill_tokens_per_s']:,.0f} tokens/s, decode "
              f"{r['decode_tokens_per_s']:,.1f} tokens/s, cache {r['cache_bytes'] / 2**20:.2f} MiB, peak RSS "
              f"+{r['peak_rss_bytes'] / 2**20:.1f} MiB" + (f", peak CUDA {r['peak_cuda_bytes'] / 2**20:.1f} MiB"
                                                         if "peak_cuda_bytes" in r else ""))
    print(f"decoding cache flat across lengths: {res['cache_flat']} (window_size {res['window_size']})")
    if args.output:
        res["plot"] = plot_profile(res, os.path.splitext(args.output)[0] + "_profile.png")
        print(f"wrote {res['plot']}")


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


def ablation(args, overrides, loaded):
    """The memory's contribution: one row per setting, printed as a table."""
    from megamem.eval.ablation import ablate_memory, ablation_table, check_has_memory

    check_has_memory(loaded.megamem)
    if loaded.tokenizer is None:
        raise ConfigError(f"{args.model}: no tokenizer saved with the model")
    rows = ablate_memory(loaded, data_config(args, overrides, loaded), args.split, args.max_batches)
    print(ablation_table(rows))
    return rows


def plot_path(explicit, output, suffix):
    """A plot's file: the flag's, else beside --output (its name + suffix), else none."""
    return explicit or (os.path.splitext(output)[0] + suffix if output else None)


def chapter_report(args, usage, results) -> None:
    """Chapter models: per-layer chapter usage over the evaluated tokens, printed, in the JSON, and plotted."""
    from megamem.eval.chapter_stats import plot_usage, usage_summary

    summary = usage_summary(usage)
    results["chapter_usage"] = {str(k): v for k, v in summary.items()}
    for layer, s in summary.items():
        print(f"chapters, layer {layer}: normalised entropy {s['normalised_entropy']:.3f}, max share "
              f"{s['max_share']:.3f}, unused {s['unused']}/{len(s['shares'])}")
    plot = plot_path(args.plot, args.output, ".png")
    if plot:
        results["chapter_plot"] = plot_usage(usage, plot)
        print(f"wrote {plot}")


def expert_report(args, loaded, experts, results) -> None:
    """PEER models: per-layer expert usage over the evaluated tokens, printed, in the JSON, and plotted."""
    from megamem.config.schema import PeerConfig
    from megamem.eval.expert_stats import expert_summary, plot_expert_usage

    summary = expert_summary(experts, loaded.cfg.model.peer_config.usage_threshold if loaded.cfg else
                             PeerConfig().usage_threshold)
    results["expert_usage"] = {str(k): v for k, v in summary.items()}
    for layer, s in summary.items():
        print(f"experts, layer {layer}: used {s['usage']:.3f}, unevenness {s['unevenness']:.3f}, "
              f"hot {s['hot_experts']}, max share {s['max_share']:.4f}")
    plot = plot_path(args.expert_plot, args.output, "_experts.png")
    if plot:
        results["expert_plot"] = plot_expert_usage(experts, plot)
        print(f"wrote {plot}")


def main(argv=None) -> int:
    import torch

    from megamem.eval import load_any, perplexity

    args, overrides = parse_args(argv)
    if args.max_batches is not None and args.max_batches < 1:
        raise ConfigError(f"--max-batches {args.max_batches}: evaluate at least 1 batch (or leave it out for the "
                          "whole split)")
    results = {"model": args.model}
    ev = evaluation_config(args, overrides, evaluation_source(args, overrides))
    results["evaluation"] = {"benchmarks": ev.benchmarks}
    loaded = None
    if args.ablate_memory or {"perplexity", "niah", "ruler", "profile"} & set(ev.benchmarks):
        loaded = load_any(args.model, torch.float32, args.routing_strategy)  # once, for every benchmark
    if args.ablate_memory:
        results["ablate_memory"] = ablation(args, overrides, loaded)
    if "perplexity" in ev.benchmarks:
        if loaded.tokenizer is None:
            raise ConfigError(f"{args.model}: no tokenizer saved with the model")
        cfg = data_config(args, overrides, loaded)
        ppl = perplexity(loaded, cfg, args.split, args.max_batches)
        usage, experts = ppl.pop("chapter_usage"), ppl.pop("expert_usage")
        results["perplexity"] = {"split": args.split, **ppl}
        print(f"{args.split}: loss {ppl['loss']:.4f}  perplexity {ppl['ppl']:.2f}  over {ppl['tokens']} tokens")
        if usage:
            chapter_report(args, usage, results)
        if experts:
            expert_report(args, loaded, experts, results)
    if {"niah", "ruler"} & set(ev.benchmarks):
        long_context(args, ev, loaded, results)
    if "profile" in ev.benchmarks:
        profile(args, ev, loaded, results)
    if "lm_eval" in ev.benchmarks:
        from megamem.eval.lm_eval_glue import run_lm_eval

        results["lm_eval"] = run_lm_eval(args.model, ev.evals, args.lm_eval_limit,
                                         args.lm_eval_batch_size or ev.eval_batch_size,
                                         trust_remote_code=args.trust_remote_code)
        for task, metrics in results["lm_eval"].items():
            print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    if args.output:
        write_json_file(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
