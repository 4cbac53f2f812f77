"""The fact-recall benchmark's parts: its data folder, its arms, and its summary (tools/bench_recall.py drives them).

Arms (ARMS, a registry: name → the config overrides that make it from the benchmark's config):
  vanilla  the config without memory (memory.vanilla_mode), the same seed's base weights (fair twins);
  matched  vanilla with model.intermediate_dim widened until it has at least the memory model's parameters;
  memory   the config as given (configs/recall_tiny.yaml: the memory recipe, docs/diagnostics.md#the-recipe);
  dense    the memory model with megamem's default reads: a softmax over every row, no qk-norm, bank std 0.02,
           W_o zero-initialised.
An arm whose config equals an earlier arm's (matched, when the memory model has no more parameters than vanilla)
shares that arm's runs (tools/bench_recall.py).
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Callable, Dict, List

from ...config import ConfigError
from ...folders import write_figure, write_json_file, write_text_file
from .corpus import KnowledgeBase, documents
from .score import word_tokenizer

ARMS: Dict[str, Callable[[Any], List[str]]] = {}
FILLER_PER_FACT = 0.5  # filler sentences per fact statement in the training documents


def arm(name: str):
    def register(fn):
        ARMS[name] = fn
        return fn
    return register


def parameter_count(cfg) -> int:
    import torch

    from ...model import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


@arm("vanilla")
def _vanilla(cfg) -> List[str]:
    return ["--memory.vanilla_mode=true"]


@arm("matched")
def _matched(cfg) -> List[str]:
    """The narrowest MLP (a multiple of 8) whose vanilla model has at least the memory model's parameters."""
    import copy

    target, wide = parameter_count(cfg), copy.deepcopy(cfg)
    wide.memory.vanilla_mode = True
    lo, hi = cfg.model.intermediate_dim, cfg.model.intermediate_dim * 64
    while lo < hi:
        wide.model.intermediate_dim = mid = (lo + hi) // 16 * 8
        if parameter_count(wide) >= target:
            hi = mid
        else:
            lo = mid + 8
    return ["--memory.vanilla_mode=true", f"--model.intermediate_dim={lo}"]


@arm("memory")
def _memory(cfg) -> List[str]:
    if cfg.memory.vanilla_mode:
        raise ConfigError("bench_recall: the config's memory arm needs memory (memory.vanilla_mode: false)")
    return []


@arm("dense")
def _dense(cfg) -> List[str]:
    return [*_memory(cfg), "--memory.memory_top_k=null", "--memory.memory_qk_norm=false",
            "--memory.memory_qk_temperature=null", "--memory.memory_init_std=0.02", "--memory.wo_init_zero=true"]


def write_data(out: str, people: int, repeats: int, seed: int) -> Dict[str, str]:
    """OUT/{train,validation}.jsonl, prompts.jsonl and tokenizer/ for a knowledge base; kept if already written."""
    paths = {k: os.path.join(out, f) for k, f in (("train", "train.jsonl"), ("validation", "validation.jsonl"),
                                                   ("prompts", "prompts.jsonl"), ("tokenizer", "tokenizer"))}
    spec = {"people": people, "repeats": repeats, "seed": seed}
    spec_path = os.path.join(out, "spec.json")
    if os.path.isfile(spec_path):
        with open(spec_path, encoding="utf-8") as f:
            if json.load(f) == spec:
                return paths
        raise ConfigError(f"bench_recall: {out} holds data of another --people/--repeats/--data-seed; "
                          "use another --out or remove it")
    kb = KnowledgeBase.build(people, seed=seed)
    os.makedirs(out, exist_ok=True)
    word_tokenizer(kb.vocabulary, paths["tokenizer"])
    lines = lambda docs: "".join(json.dumps({"text": d}) + "\n" for d in docs)  # noqa: E731
    write_text_file(paths["train"], lines(documents(kb, repeats, 4, FILLER_PER_FACT, seed + 1)))
    write_text_file(paths["validation"], lines(documents(kb, 1, 4, FILLER_PER_FACT, seed + 2)[:64]))
    write_text_file(paths["prompts"], "".join(json.dumps({"prompt": p, "value": v}) + "\n" for p, v in kb.prompts()))
    write_json_file(spec_path, spec)
    return paths


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per arm: parameters, recall on / off / mean bank as mean ± sd over its seeds, and the ablation drop."""
    rows = []
    for name in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == name]
        row: Dict[str, Any] = {"arm": name, "parameters": mine[0]["parameters"], "seeds": [r["seed"] for r in mine]}
        for key in ("on", "off", "mean bank"):
            values = [r["recall"][key] for r in mine if key in r["recall"]]
            if values:
                row[key] = values
                row[f"{key} mean"] = statistics.fmean(values)
                row[f"{key} sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if "off" in row:
            row["drop"] = row["on mean"] - row["off mean"]
        rows.append(row)
    return rows


def markdown(rows: List[Dict[str, Any]]) -> str:
    cell = lambda r, k: f"{r[k + ' mean']:.1f} ± {r[k + ' sd']:.1f}" if k + " mean" in r else "—"  # noqa: E731
    lines = ["| arm | parameters | seeds | recall % | memory off | mean bank | drop when off |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = f"{r['drop']:+.1f}" if "drop" in r else "—"
        lines.append(f"| {r['arm']} | {r['parameters'] / 1e6:.2f}M | {len(r['seeds'])} | {cell(r, 'on')} | "
                     f"{cell(r, 'off')} | {cell(r, 'mean bank')} | {drop} |")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: str, title: str) -> None:
    """Recall per arm (bars: mean; dots: each seed), with the memory switched off beside each memory arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = {"on": "recall", "off": "memory off"}  # each legend entry on its first bar only
    for i, r in enumerate(rows):
        for j, (key, color) in enumerate((("on", "C0"), ("off", "C3"))):
            if key not in r:
                continue
            x = i + (0.2 * (2 * j - 1) if "off" in r else 0)
            ax.bar(x, r[f"{key} mean"], 0.38, yerr=r[f"{key} sd"], color=color, alpha=0.75, capsize=3,
                   label=labels.pop(key, None))
            ax.plot([x] * len(r[key]), r[key], "k.", ms=4)
    ax.set_xticks(range(len(rows)), [f"{r['arm']}\n{r['parameters'] / 1e6:.2f}M" for r in rows])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_figure(fig, path)
