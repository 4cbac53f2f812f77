#!/usr/bin/env python
"""Ablations: one run per value of one config key, trained, evaluated and compared in one table.

    python tools/ablate.py --config configs/tiny_cpu.yaml --ablation-mode memory.num_memory_tokens \
        --ablation-values 64 128 --output outputs/ablation
    python tools/ablate.py --config my_ablation.yaml        # its evaluation.ablation_mode / ablation_values

The mode is any dotted config key, or a named mode: irrational (model.pos_encoding.irrational),
hybrid_k (model.pos_encoding.hybrid_K), data_mix (data.data_mix), experts
(model.peer_config.num_experts), selection_heads (model.peer_config.num_heads). Each arm trains with
scripts/train.py into OUTPUT/<mode>=<value>/ (its own training.output_dir), then scripts/eval.py
evaluates its export with the config's evaluation section (eval.json). Reruns skip finished work: an
arm with an export (final/megamem_format.json) is not trained again, one with eval.json not evaluated
again; an arm stopped mid-run resumes from its checkpoints. The comparison: OUTPUT/ablation.md,
ablation.json and ablation.png. Other --section.key overrides apply to every arm.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megamem.cli import ArgumentParser, run_cli  # noqa: E402
from megamem.folders import write_json_file, write_text_file  # noqa: E402
from megamem.config import ConfigError, load_config  # noqa: E402

MODES = {"irrational": "model.pos_encoding.irrational", "hybrid_k": "model.pos_encoding.hybrid_K",
         "data_mix": "data.data_mix", "experts": "model.peer_config.num_experts",
         "selection_heads": "model.peer_config.num_heads",
         "attractor": "model.attractor.use_attractor", "alpha_policy": "model.attractor.alpha_policy"}


def run_step(cmd: List[str], log: str) -> None:
    """Run one train/eval command, its output into log; a failure stops the ablation naming the log."""
    print("running: " + " ".join(cmd[1:]), flush=True)
    with open(log, "a", encoding="utf-8") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        tail = open(log, encoding="utf-8").read().strip().splitlines()[-1:] or [""]
        raise ConfigError(f"{' '.join(cmd[1:3])} failed (exit {code}): {tail[0]} — see {log}")


def dotted_key(mode: str, config: str, overrides: List[str], value: str) -> str:
    """The config key a mode varies; refused in one line when this megamem has no such key."""
    key = MODES.get(mode, mode)
    if "." not in key:
        raise ConfigError(f"--ablation-mode {mode}: give a dotted config key (memory.num_memory_tokens) or one of "
                          f"{', '.join(MODES)}")
    try:
        load_config(config, [*overrides, f"--{key}={value}"])
    except ConfigError as e:
        raise ConfigError(f"--ablation-mode {mode} = {value}: {e}") from None
    return key


def raw(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def last_train_loss(metrics: str) -> Any:
    loss = None
    if os.path.isfile(metrics):
        for line in open(metrics, encoding="utf-8"):
            rec = json.loads(line)
            if rec.get("kind") == "train":
                loss = rec.get("loss")
    return loss


def summary(value: str, arm: str) -> Dict[str, Any]:
    """One table row: the arm's last train loss and its eval.json scores."""
    row: Dict[str, Any] = {"value": value, "train_loss": last_train_loss(os.path.join(arm, "metrics.jsonl"))}
    res = json.load(open(os.path.join(arm, "eval.json"), encoding="utf-8"))
    if "perplexity" in res:
        row["eval_loss"], row["eval_ppl"] = res["perplexity"]["loss"], res["perplexity"]["ppl"]
    if "niah" in res:
        cells = [v for r in res["niah"]["grid"].values() for v in r.values()]
        row["niah_mean"] = sum(cells) / len(cells)
    if "ruler" in res:
        avg = res["ruler"]["average"]
        row["ruler_mean"] = sum(avg.values()) / len(avg)
        row["ruler_effective_length"] = res["ruler"]["effective_length"]
    for task, metrics in (res.get("lm_eval") or {}).items():
        for name, v in metrics.items():
            if name.startswith("acc") and "stderr" not in name and isinstance(v, (int, float)):
                row[f"{task}_{name.split(',')[0]}"] = v
    return row


def write_table(out: str, mode: str, key: str, rows: List[Dict[str, Any]]) -> Dict[str, str]:
    """ablation.md, ablation.json and ablation.png (each numeric column per value) in out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = [f"# Ablation of {mode} ({key})", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    paths = {k: os.path.join(out, f"ablation.{k}") for k in ("md", "json", "png")}
    write_text_file(paths["md"], "\n".join(lines) + "\n")
    write_json_file(paths["json"], {"mode": mode, "key": key, "arms": rows})
    numeric = [c for c in cols if c != "value" and any(isinstance(r.get(c), (int, float)) for r in rows)]
    fig, axes = plt.subplots(1, max(len(numeric), 1), figsize=(3.2 * max(len(numeric), 1), 3), squeeze=False)
    for ax, c in zip(axes[0], numeric):
        ax.bar([r["value"] for r in rows], [r.get(c) or 0 for r in rows])
        ax.set_title(c, fontsize=9)
        ax.set_xlabel(mode, fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--ablation-mode", help="dotted config key or named mode (default: evaluation.ablation_mode)")
    p.add_argument("--ablation-values", nargs="+", help="one arm per value (default: evaluation.ablation_values)")
    p.add_argument("--output", help="ablation folder (default: <training.output_dir>/ablation)")
    p.add_argument("--no-eval", action="store_true", help="train the arms only (the table has train losses)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config for each arm's training")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --training.max_steps=5)")
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    mode = args.ablation_mode or cfg.evaluation.ablation_mode
    values = [raw(v) for v in (args.ablation_values or cfg.evaluation.ablation_values or [])]
    if not mode or not values:
        raise ConfigError("name what to vary: --ablation-mode KEY --ablation-values V1 V2 (or evaluation."
                          "ablation_mode / ablation_values in the config)")
    keys = {dotted_key(mode, args.config, overrides, v) for v in values}
    key = keys.pop()
    out = os.path.abspath(args.output or os.path.join(cfg.training.output_dir, "ablation"))
    os.makedirs(out, exist_ok=True)
    rows = []
    for value in values:
        arm = os.path.join(out, f"{mode}={value}".replace(os.sep, "_"))
        os.makedirs(arm, exist_ok=True)
        log, final = os.path.join(arm, "log.txt"), os.path.join(arm, "final")
        arm_args = [*overrides, f"--{key}={value}", f"--training.output_dir={arm}"]
        if not os.path.isfile(os.path.join(final, "megamem_format.json")):
            resume = [f"--training.resume_from_checkpoint={arm}/checkpoints"] \
                if os.path.isdir(os.path.join(arm, "checkpoints")) else []
            ds = ["--deepspeed", args.deepspeed] if args.deepspeed else []
            run_step([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
                      os.path.abspath(args.config), *ds, *arm_args, *resume], log)
        else:
            print(f"{mode}={value}: trained already ({final})")
        if args.no_eval:
            rows.append({"value": value, "train_loss": last_train_loss(os.path.join(arm, "metrics.jsonl"))})
            continue
        if not os.path.isfile(os.path.join(arm, "eval.json")):
            run_step([sys.executable, os.path.join(ROOT, "scripts", "eval.py"), "--model", final, "--output",
                      os.path.join(arm, "eval.json"), *[o for o in overrides if o.startswith("--evaluation.")]], log)
        else:
            print(f"{mode}={value}: evaluated already ({arm}/eval.json)")
        rows.append(summary(value, arm))
    paths = write_table(out, mode, key, rows)
    print(open(paths["md"], encoding="utf-8").read())
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
