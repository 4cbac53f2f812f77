"""Recall of the knowledge corpus's facts: greedy exact match of the (one-token) attribute value.

`word_tokenizer` makes the corpus's word-level tokenizer (every word one token), so the greedy answer
to a prompt is the argmax of the last position's logits, and exact match is that id == the value's id.
`recall_table` measures it with the memory on, every memory layer off, and every bank replaced by its
mean row (megamem.eval.ablation), on the same prompts.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch

from ...config import ConfigError
from ..ablation import ablated
from ...model.diagnostics import memory_branches

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(vocabulary: Sequence[str], out_dir: str):
    """A word-level tokenizer (whitespace split, one id per word, ids 0-3 the special tokens) saved at out_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in vocabulary if w not in SPECIALS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def encode_prompts(tokenizer, prompts: Sequence[Tuple[str, str]]) -> List[Tuple[List[int], int]]:
    """(prompt ids, value id); a value that is not one known token is refused (recall would be ill-defined)."""
    out = []
    for prompt, value in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(value, add_special_tokens=False)["input_ids"]
        if len(target) != 1 or target[0] == tokenizer.unk_token_id or tokenizer.unk_token_id in ids:
            raise ConfigError(f"recall prompt {prompt!r} → {value!r} is not in the tokenizer's vocabulary "
                              "(the corpus and its word tokenizer must come from the same knowledge base)")
        out.append((ids, target[0]))
    return out


@torch.no_grad()
def recall(model, encoded: Sequence[Tuple[List[int], int]], batch_size: int = 256) -> float:
    """Percent of prompts whose greedy next token is the value. Prompts of one length are batched (no padding)."""
    by_length: Dict[int, List[Tuple[List[int], int]]] = {}
    for ids, target in encoded:
        by_length.setdefault(len(ids), []).append((ids, target))
    device = next(model.parameters()).device
    hits = 0
    for items in by_length.values():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            x = torch.tensor([ids for ids, _ in chunk], device=device)
            pred = model(x).logits[:, -1].argmax(-1)
            hits += int((pred == torch.tensor([t for _, t in chunk], device=device)).sum())
    return 100.0 * hits / max(len(encoded), 1)


def recall_table(model, encoded: Sequence[Tuple[List[int], int]]) -> Dict[str, float]:
    """{"on": recall} and, for a model with memory, "off" (every memory branch's output removed) and "mean bank"."""
    model.eval()
    table = {"on": recall(model, encoded)}
    layers = [i for i, _ in memory_branches(model)]
    if layers:
        with ablated(model, off_layers=layers):
            table["off"] = recall(model, encoded)
        with ablated(model, mean_banks=True):
            table["mean bank"] = recall(model, encoded)
    return table
