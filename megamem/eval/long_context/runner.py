"""Run NIAH grids and RULER tasks on any causal LM: megamem exports and checkpoints, HF folders.

A `TextModel` counts tokens, knows the longest input it supports, and answers a prompt greedily (or
sampled, as the evaluation config says). Lengths the model cannot read are refused before any work.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ...config import ConfigError
from ...folders import write_figure
from .scoring import METRICS, averages, effective_length
from .tasks import ANSWER, NIAH, TASKS, Sample, make_sample


@dataclass
class TextModel:
    count: Callable[[str], int]  # tokens of a prompt as the model will read it
    answer: Callable[[str], str]  # prompt → the generated continuation (text)
    max_length: Optional[int]  # longest input + output it supports (None: no stated limit)
    name: str = "model"


def text_model(loaded, max_new_tokens: int, chat_template: str = "auto", temperature: float = 0.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: bool = False) -> TextModel:
    """A TextModel over megamem.eval.load_any's result (its tokenizer and chat template).

    Prompts hold ANSWER between the question and the answer prefix: without a chat template they are
    read as one text; with one, the question is the user's turn and the prefix opens the reply."""
    import torch

    tok, hf = loaded.tokenizer, loaded.hf
    if tok is None:
        raise ConfigError("long-context evaluation needs the model's tokenizer (none saved with it)")
    has_template = bool(getattr(tok, "chat_template", None))
    if chat_template == "on" and not has_template:
        raise ConfigError("--chat-template on: the model's tokenizer has no chat template")
    use_template = chat_template == "on" or (chat_template == "auto" and has_template)

    def ids(prompt: str) -> List[int]:
        question, _, prefix = prompt.partition(ANSWER)
        if use_template:  # the question is the user's turn; the answer prefix starts the assistant's reply
            head = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
            return list(head) + tok(prefix.lstrip(), add_special_tokens=False)["input_ids"]
        return tok(question + prefix, add_special_tokens=True)["input_ids"]

    def answer(prompt: str) -> str:
        x = torch.tensor([ids(prompt)], device=next(hf.parameters()).device)
        sample = do_sample or temperature > 0
        kwargs = dict(do_sample=sample, max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(x),
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        kwargs.update(temperature=temperature or 1.0, top_k=top_k or 0, top_p=top_p or 1.0) if sample else \
            kwargs.update(temperature=None, top_k=None, top_p=None)
        with torch.no_grad():
            out = hf.generate(x, **kwargs)
        return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)

    limit = None
    if loaded.cfg is not None and loaded.cfg.model.base_model_name is None:
        limit = loaded.cfg.model.max_seq_len
    else:
        limit = getattr(getattr(hf, "config", None), "max_position_embeddings", None)
    return TextModel(lambda text: len(ids(text)), answer, limit)


def check_lengths(model: TextModel, lengths: Sequence[int], max_new_tokens: int, key: str) -> None:
    for n in lengths:
        if n <= max_new_tokens:
            raise ConfigError(f"{key} {n}: leaves no room for the prompt after max_new_tokens = {max_new_tokens}")
        if model.max_length is not None and n > model.max_length:
            raise ConfigError(f"{key} {n}: the model reads at most {model.max_length} tokens (its max_seq_len / "
                              "max_position_embeddings); evaluate lengths up to that")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", leave=False)


def _score(model: TextModel, samples: Sequence[Sample], metrics: Sequence[str], bar) -> Tuple[float, Dict[str, float]]:
    """Answer every sample; (the task's own score, each extra metric's score)."""
    preds = []
    for s in samples:
        preds.append(model.answer(s.prompt))
        bar.update()
    refs = [s.references for s in samples]
    return METRICS[samples[0].metric](preds, refs), {m: METRICS[m](preds, refs) for m in metrics}


def run_niah(model: TextModel, lengths: Sequence[int], depths: Sequence[float], num_samples: int, seed: int,
             max_new_tokens: int, task: str = "niah_single_1", haystack: Optional[str] = None,
             metrics: Sequence[str] = ()) -> Dict:
    """Score per (length, depth): one needle at that depth, num_samples samples each."""
    if task not in NIAH:
        raise ConfigError(f"niah_task '{task}'; valid: {', '.join(NIAH)}")
    check_lengths(model, lengths, max_new_tokens, "niah_lengths")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"niah_depths {d}: a depth is a fraction of the haystack, 0 to 1")
    grid: Dict[str, Dict[str, float]] = {}
    extra: Dict[str, Dict[str, Dict[str, float]]] = {m: {} for m in metrics}
    bar = _progress(len(lengths) * len(depths) * num_samples, "niah")
    for n in lengths:
        for d in depths:
            rng = random.Random(f"{seed}-{task}-{n}-{d}")
            samples = [make_sample(task, n - max_new_tokens, model.count, rng, depth=d, haystack=haystack)
                       for _ in range(num_samples)]
            grid.setdefault(str(n), {})[str(d)], more = _score(model, samples, metrics, bar)
            for m, v in more.items():
                extra[m].setdefault(str(n), {})[str(d)] = v
    bar.close()
    return {"task": task, "grid": grid, **({"metrics": extra} if metrics else {})}


def run_ruler(model: TextModel, tasks: Sequence[str], lengths: Sequence[int], num_samples: int, seed: int,
              max_new_tokens: int, metrics: Sequence[str] = (), threshold: float = 85.6) -> Dict:
    """Per task and length: the task's RULER score; the average per length and the effective length."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"ruler_tasks {bad}; valid: {', '.join(TASKS)}")
    check_lengths(model, lengths, max_new_tokens, "ruler lengths")
    scores: Dict[str, Dict[int, float]] = {}
    extra: Dict[str, Dict[str, Dict[int, float]]] = {m: {} for m in metrics}
    bar = _progress(len(tasks) * len(lengths) * num_samples, "ruler")
    for task in tasks:
        for n in lengths:
            rng = random.Random(f"{seed}-{task}-{n}")
            samples = [make_sample(task, n - max_new_tokens, model.count, rng) for _ in range(num_samples)]
            scores.setdefault(task, {})[n], more = _score(model, samples, metrics, bar)
            for m, v in more.items():
                extra[m].setdefault(task, {})[n] = v
    bar.close()
    avg = averages(scores)
    return {"scores": {t: {str(n): v for n, v in s.items()} for t, s in scores.items()},
            "average": {str(n): v for n, v in avg.items()}, "threshold": threshold,
            "effective_length": effective_length(avg, threshold),
            **({"metrics": {m: {t: {str(n): v for n, v in s.items()} for t, s in e.items()}
                            for m, e in extra.items()}} if metrics else {})}


def ruler_lengths(max_length: int, smallest: int = 1024) -> List[int]:
    """max_length, max_length/2, … down to `smallest` (RULER evaluates powers of two up to its maximum)."""
    out, n = [], max_length
    while n >= smallest:
        out.append(n)
        n //= 2
    return sorted(out) or [max_length]


def plot_niah(result: Dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(result["grid"])
    depths = list(result["grid"][lengths[0]])
    data = [[result["grid"][n][d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"needle in a haystack ({result['task']})")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    return write_figure(fig, path)


def plot_ruler(result: Dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task, s in result["scores"].items():
        ax.plot([int(n) for n in s], list(s.values()), marker="o", label=task)
    ax.plot([int(n) for n in result["average"]], list(result["average"].values()), "k--", lw=2, label="average")
    ax.axhline(result["threshold"], color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
    ax.set_title(f"RULER tasks (effective length: {result['effective_length']})")
    fig.tight_layout()
    return write_figure(fig, path)
