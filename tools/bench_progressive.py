#!/usr/bin/env python
"""Stack-Wise training side by side at one token budget: full vs blockwise-frozen vs fused with LoRA on the trunk.

    python tools/bench_progressive.py --config configs/stackwise_fused_lora.yaml --tokens 122880 \
        --out outputs/bench_progressive --training.warmup_steps 5 --training.eval_steps 15

From the one config (model, data, seed, batch, and its schedule block_size × total_blocks) three arms train
the same number of tokens, each through the real tools as a subprocess: `full` (scripts/train.py, mode full),
`blockwise_frozen` and `fused_lora` (tools/progressive.py; see megamem.eval.progressive_bench for exactly
which keys each arm sets). Per arm: final eval loss and perplexity (the last eval of its last run, on the
config's eval split), wall time of its command(s), summed step time and tokens from its metrics.jsonl, and
ratios vs full. Writes OUT/bench.md, bench.json and bench.png (loss over tokens, phase starts dashed).
Reruns skip finished arms (their wall time is kept in OUT/wall.json) and resume an interrupted one.
Other --section.key overrides apply to the base config. See docs/progressive.md.
"""
from __future__ import annotations

import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402


def machine() -> dict:
    """What the timings ran on (the CPU may be shared: each arm's entry in wall.json has the load around it)."""
    import torch

    return {"machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def load_avg() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main(argv=None) -> int:
    from ablate import run_step
    from megamem.config import save_config
    from megamem.eval.phase_curves import plot_arms
    from megamem.eval.progressive_bench import (add_ratios, arm_configs, arm_curves, arm_finished, arm_row,
                                                markdown_table, tokens_per_step)
    from megamem.folders import write_json_file, write_text_file
    from megamem.config import load_config
    from megamem.parallel.checkpoint_files import complete_tags

    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="Any --section.key VALUE overrides that key of the base config (every arm).")
    p.add_argument("--config", required=True, help="base config with a progressive schedule (configs/stackwise_*.yaml)")
    p.add_argument("--tokens", type=int, required=True,
                   help="tokens each arm trains: a multiple of tokens per step × total_blocks")
    p.add_argument("--out", help="benchmark folder (default: <training.output_dir>/bench)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON for every arm's runs (see ds_configs/)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --training.warmup_steps=2)")
    base = load_config(args.config, overrides)
    out = os.path.abspath(args.out or os.path.join(base.training.output_dir, "bench"))
    arms = arm_configs(base, args.tokens, out)
    os.makedirs(out, exist_ok=True)
    walls_path = os.path.join(out, "wall.json")
    walls = load_json(walls_path)
    ds = ["--deepspeed", os.path.abspath(args.deepspeed)] if args.deepspeed else []
    for name, cfg in arms.items():
        if arm_finished(cfg):
            print(f"{name}: finished already ({cfg.training.output_dir}), skipped")
            continue
        if cfg.training.mode == "full" and complete_tags(os.path.join(cfg.training.output_dir, "checkpoints")):
            cfg.training.resume_from_checkpoint = "latest"
        path = os.path.join(out, f"{name}.yaml")
        save_config(cfg, path)
        script = "scripts/train.py" if cfg.training.mode == "full" else "tools/progressive.py"
        entry = walls.setdefault(name, {"wall_s": 0.0, "runs": []})
        load, start = load_avg(), time.perf_counter()
        run_step([sys.executable, os.path.join(ROOT, script), "--config", path, *ds], os.path.join(out, f"{name}.log"))
        # a resumed arm adds its rerun to the time of the run that was stopped (start-up included)
        took = time.perf_counter() - start
        entry["wall_s"] += took
        entry["runs"].append({"wall_s": took, "load_avg_1min_before": load, "load_avg_1min_after": load_avg()})
        write_json_file(walls_path, walls)
    curves = {name: arm_curves(cfg) for name, cfg in arms.items()}
    rows = [arm_row(name, cfg, curves[name], walls.get(name, {}).get("wall_s")) for name, cfg in arms.items()]
    add_ratios(rows)
    table = markdown_table(rows)
    cfg0 = base.training
    head = (f"# Stack-Wise arms at {args.tokens:,} tokens each ({args.config}: {base.model.num_layers} layers, "
            f"{arms['fused_lora'].training.total_blocks} blocks of {arms['fused_lora'].training.block_size}, "
            f"{tokens_per_step(base):,} tokens/step, seed {cfg0.seed})")
    host = machine()
    loads = ", ".join(f"{name} {r['load_avg_1min_before']}→{r['load_avg_1min_after']}"
                      for name in arms for r in walls.get(name, {}).get("runs", []))
    where = (f"{host['cores']} cores, OMP_NUM_THREADS={host['OMP_NUM_THREADS']}, torch {host['torch']}"
             f"{', ' + host['cuda'] if host['cuda'] else ''}; 1-min load average before→after each arm: {loads}")
    write_text_file(os.path.join(out, "bench.md"), f"{head}\n\n{table}\n\n{where}\n")
    write_json_file(os.path.join(out, "bench.json"), {
        "config": args.config, "overrides": overrides, "tokens": args.tokens, "arms": rows,
        "machine": host, "runs": walls, "curves": curves})
    plot_arms(curves, os.path.join(out, "bench.png"),
              f"{args.tokens:,} tokens per arm: loss over tokens (vertical lines: phase starts)")
    print(f"{head}\n\n{table}\n\n{where}\n\nwrote {out}/bench.md, bench.json, bench.png")
    return 0


def load_json(path: str) -> dict:
    import json

    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(run_cli(main))
