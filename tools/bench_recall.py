#!/usr/bin/env python
"""Does the memory store facts? Recall of a synthetic knowledge corpus, arm against arm, over seeds.

    python tools/bench_recall.py --out outputs/bench_recall                       # configs/recall_tiny.yaml
    python tools/bench_recall.py --out outputs/bench_recall --arms vanilla memory --seeds 0 1 --training.max_steps 300

Writes a seeded knowledge corpus (megamem.eval.recall: made-up people with a city and a job each, every
fact stated --repeats times in varied templates among filler; a word-level tokenizer, so a value is one
token) to OUT/data, then trains every arm × seed through scripts/train.py (the config's keys plus the arm's,
see megamem.eval.recall.bench.ARMS) and scores each final export: recall = greedy exact match of the value
after each template's prompt, with the memory on, every memory layer off, and every bank replaced by its
mean row. Prints and writes OUT/recall.md (mean ± sd per arm), recall.json and recall.png. Finished runs
are kept and not retrained. Other --section.key VALUE overrides apply to every arm. See docs/diagnostics.md.
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv):
    from megamem.eval.recall.bench import ARMS

    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="Any --section.key VALUE overrides that key of the config (every arm).")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "recall_tiny.yaml"))
    p.add_argument("--out", required=True, help="benchmark folder: data/, runs/<arm>-s<seed>/, recall.{md,json,png}")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["vanilla", "matched", "memory"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--people", type=int, default=300, help="people in the knowledge base (2 facts each)")
    p.add_argument("--repeats", type=int, default=8, help="times each fact is stated in the training corpus")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--deepspeed", help="DeepSpeed JSON for every run (default: scripts/train.py's own)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --training.max_steps=600)")
    if args.people < 1 or args.repeats < 1:
        p.error("--people and --repeats must be at least 1")
    return args, overrides


def score(run_dir: str, prompts):
    from megamem.eval.loading import load_any
    from megamem.eval.recall import encode_prompts, recall_table

    loaded = load_any(os.path.join(run_dir, "final"))
    model = loaded.megamem
    return recall_table(model, encode_prompts(loaded.tokenizer, prompts)), sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    from ablate import run_step
    from megamem.config import config_to_dict, load_config
    from megamem.eval.recall.bench import ARMS, markdown, plot, summarise, write_data
    from megamem.folders import write_json_file, write_text_file

    args, overrides = parse_args(argv)
    out = os.path.abspath(args.out)
    data = write_data(os.path.join(out, "data"), args.people, args.repeats, args.data_seed)
    datasets = f"[{{path: {data['train']}, eval_path: {data['validation']}}}]"
    common = [*overrides, "--model.tokenizer_name", data["tokenizer"], "--data.datasets", datasets]
    base = load_config(args.config, common)
    ds = ["--deepspeed", os.path.abspath(args.deepspeed)] if args.deepspeed else []
    with open(data["prompts"], encoding="utf-8") as f:
        prompts = [(r["prompt"], r["value"]) for r in map(json.loads, f)]
    runs = []
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    trains = {}  # resolved config → the first arm that trains it: an arm whose config equals it shares its runs
    for name in args.arms:
        extra = ARMS[name](base)
        resolved = load_config(args.config, [*common, *extra])  # a bad arm × config is refused before anything trains
        owner = trains.setdefault(json.dumps(config_to_dict(resolved), sort_keys=True, default=str), name)
        if owner != name:
            print(f"{name}: the same config as {owner} (e.g. matched when the memory model has no more parameters "
                  f"than vanilla): its runs are {owner}'s", flush=True)
        for seed in args.seeds:
            run_dir = os.path.join(out, "runs", f"{owner}-s{seed}")
            if not os.path.isfile(os.path.join(run_dir, "final", "config.yaml")):
                start = time.perf_counter()
                run_step([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", args.config, *ds,
                          *common, *extra, "--training.seed", str(seed), "--training.output_dir", run_dir],
                         os.path.join(out, "runs", f"{owner}-s{seed}.log"))
                print(f"{name} seed {seed}: trained in {time.perf_counter() - start:.0f} s", flush=True)
            table, params = score(run_dir, prompts)
            runs.append({"arm": name, "seed": seed, "parameters": params, "recall": table, "overrides": extra})
            print(f"{name} seed {seed}: recall " + ", ".join(f"{k} {v:.1f}" for k, v in table.items()), flush=True)
    rows = summarise(runs)
    t = base.training
    head = (f"# Fact recall: {args.people} people × 2 facts, each stated {args.repeats}×; {base.model.num_layers} layers, "
            f"d={base.model.hidden_dim}; {t.max_steps} steps of {t.batch_size}×{t.max_length} tokens; "
            f"seeds {' '.join(map(str, args.seeds))}")
    table = markdown(rows)
    print(f"\n{head}\n\n{table}")
    write_text_file(os.path.join(out, "recall.md"), f"{head}\n\n{table}\n")
    write_json_file(os.path.join(out, "recall.json"), {"config": args.config, "overrides": overrides,
                                                       "people": args.people, "repeats": args.repeats,
                                                       "data_seed": args.data_seed, "runs": runs, "arms": rows})
    plot(rows, os.path.join(out, "recall.png"), head.lstrip("# "))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
