#!/usr/bin/env python
"""Frozen base vs memory adapter vs LoRA vs both, on one adapter config: held-out loss after the
same number of steps (same seed, data, schedule), trainable parameters, and median step time.

    python tools/compare_adapters.py --config configs/adapter_smollm2_135m.yaml \
        --steps 20 --batch-size 4 --max-length 128 --eval-batches 8 --out outputs/compare_adapters

Each trained mode is one `scripts/train.py` run (its own process) with the eval at its last step
only; the frozen base is evaluated here on the same eval batches with the same token-weighted loss
as the trainer's. Step times of separate runs on a shared machine are not comparable, so the modes
are also timed side by side: one process, one batch, the modes alternating each round (medians). Extra `--section.key
VALUE` arguments go to every run (e.g. --memory.num_memory_tokens 128). Runs (and the base's loss)
that already finished under --out are reused (delete the folder to rerun).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = {  # name -> overrides that select it (docs/adapters.md: modes)
    "memory": ["--memory.use_memory_adapter", "true", "--memory.use_lora", "false"],
    "lora": ["--memory.use_memory_adapter", "false", "--memory.use_lora", "true"],
    "both": ["--memory.use_both_memory_and_lora", "true"],
}


def common_overrides(args, out: str) -> list:
    return ["--training.max_steps", str(args.steps), "--training.batch_size", str(args.batch_size),
            "--training.max_length", str(args.max_length), "--training.eval_max_batches", str(args.eval_batches),
            "--training.eval_steps", str(args.steps), "--training.save_steps", str(args.steps),
            "--training.logging_steps", "1", "--training.warmup_steps", str(max(1, args.steps // 10)),
            "--training.gradient_accumulation_steps", "1", "--training.seed", str(args.seed),
            "--training.output_dir", out]


def read_run(out: str):
    """(final eval loss, median step time in s over steps after the first) from a run's metrics.jsonl."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    evals = [r for r in records if r["kind"] == "eval"]
    times = [r["step_time_s"] for r in records if r["kind"] == "train"]
    if not evals or not times:
        return None
    return evals[-1]["eval_loss"], statistics.median(times[1:] or times)


def base_eval(cfg) -> float:
    """Loss of the unmodified pretrained model on the first eval batches (the trainer's weighting)."""
    import torch
    import torch.nn.functional as F

    from megamem.adapter.base import load_base
    from megamem.data import build_loader, load_tokenizer

    model = load_base(cfg).eval()
    loader = build_loader(cfg, load_tokenizer(cfg), "eval", 0, 1)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i, batch in zip(range(cfg.training.eval_max_batches), loader):
                logits = model(input_ids=batch["input_ids"]).logits
                labels = batch["labels"][:, 1:]
                n = (labels != -100).sum().item()
                total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                         ignore_index=-100).item() * n
                count += n
    finally:
        if hasattr(loader, "close"):
            loader.close()
    return total / count


def cached_base_eval(cfg, args) -> float:
    """base_eval, kept in <out>/frozen_base.json for the same base and eval batches."""
    key = {"base": cfg.model.base_model_name, "eval_batches": args.eval_batches, "batch_size": args.batch_size,
           "max_length": args.max_length}
    path = os.path.join(args.out, "frozen_base.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved["eval_loss"]
    loss = base_eval(cfg)
    os.makedirs(args.out, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"key": key, "eval_loss": loss}, f)
    os.replace(path + ".tmp", path)
    return loss


def side_by_side_step_times(configs, rounds: int) -> dict:
    """Median seconds of one training step (forward, backward, AdamW) per mode, the modes alternating
    within each round in this one process on the same batch, after one warm-up round."""
    import torch

    from megamem.adapter import build_adapter_model
    from megamem.data import build_loader, load_tokenizer

    first = next(iter(configs.values()))
    loader = build_loader(first, load_tokenizer(first), "train", 0, 1)
    batch = next(iter(loader))
    if hasattr(loader, "close"):
        loader.close()
    models = {m: build_adapter_model(cfg, seed=cfg.training.seed).train() for m, cfg in configs.items()}
    optims = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
              for m, model in models.items()}
    times = {m: [] for m in models}
    for r in range(rounds + 1):
        for m, model in models.items():
            start = time.perf_counter()
            out = model(batch["input_ids"], labels=batch["labels"])
            (out.loss + sum(out.aux_losses.values())).backward()
            optims[m].step()
            optims[m].zero_grad(set_to_none=True)
            if r:
                times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def trainable(cfg) -> tuple:
    """(trainable, total) parameter counts of the adapted model, built on the meta device."""
    from megamem.cli import _adapter_on_meta

    model, note = _adapter_on_meta(cfg)
    if model is None:
        raise SystemExit(note)
    counts = model.parameter_counts()
    return counts["trainable"], counts["total"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other --section.key VALUE arguments override the config in every run.")
    p.add_argument("--config", required=True, help="an adapter config (model.base_model_name set)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches (the first of the eval split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="memory,lora,both", help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--out", default="outputs/compare_adapters")
    p.add_argument("--timing-rounds", type=int, default=3,
                   help="rounds of the side-by-side step timing (modes alternating in one process); 0 skips it")
    args, extra = p.parse_known_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {unknown}; valid: {', '.join(MODES)}")

    from megamem.config import load_config

    configs = {m: load_config(args.config, common_overrides(args, os.path.join(args.out, m)) + MODES[m] + extra)
               for m in modes}  # every config is validated before any run starts
    first = next(iter(configs.values()))
    if first.model.base_model_name is None:
        p.error(f"--config {args.config}: model.base_model_name is not set (not an adapter config)")
    rows = []
    start = time.perf_counter()
    loss = cached_base_eval(first, args)
    rows.append(("frozen base", 0, trainable(first)[1], loss, None))
    print(f"frozen base: eval loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    for mode, cfg in configs.items():
        out = os.path.join(args.out, mode)
        result = read_run(out)
        if result is None:
            cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", args.config,
                   *common_overrides(args, out), *MODES[mode], *extra]
            print(f"{mode}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=os.getcwd())
            result = read_run(out)
            print(f"{mode}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        n_train, n_total = trainable(cfg)
        rows.append((mode, n_train, n_total, *result))
    tokens = args.batch_size * args.max_length
    side = side_by_side_step_times(configs, args.timing_rounds) if args.timing_rounds else {}
    print(f"\n{args.steps} steps of {args.batch_size} x {args.max_length} tokens, seed {args.seed}, "
          f"eval on the first {args.eval_batches} held-out batches")
    ref = next(iter(side.values()), None)
    print("| mode | trainable params | held-out loss | perplexity | step time in its run (median) "
          "| side-by-side step time (ratio to the first mode) |")
    print("|---|---|---|---|---|---|")
    for name, n_train, n_total, loss, step in rows:
        step_s = f"{step:.1f} s ({tokens / step:.0f} tok/s)" if step else "-"
        share = f"{n_train:,} ({100 * n_train / n_total:.2f}%)"
        both = f"{side[name]:.1f} s ({side[name] / ref:.2f}x)" if name in side else "-"
        print(f"| {name} | {share} | {loss:.4f} | {math.exp(loss):.2f} | {step_s} | {both} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
