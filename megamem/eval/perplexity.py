"""Perplexity over a data split: token-weighted mean NLL of every labelled token, as training's eval."""
from __future__ import annotations

import math
import os
from typing import Dict, Optional

import torch

from ..config import ConfigError


@torch.no_grad()
def perplexity(loaded, cfg, split: str = "eval", max_batches: Optional[int] = None) -> Dict[str, object]:
    """{"loss", "ppl", "tokens", "batches", "chapter_usage", "expert_usage"}; chapter_usage: per memory layer, reads
    per chapter; expert_usage: per PEER layer, selections per expert (counted here even without log_expert_usage)."""
    from tqdm.auto import tqdm

    from ..data import build_loader
    from ..model import MemoryTransformer

    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"--max-batches {max_batches}: evaluate at least 1 batch (or leave it out for the whole split)")
    ours = isinstance(loaded.megamem, MemoryTransformer)
    model = loaded.megamem if ours else loaded.hf
    model.eval()
    from ..model.mlp.peer import peer_modules

    peers = peer_modules(model) if ours else {}
    for peer in peers.values():
        peer.log_usage = True
    experts: Dict[int, torch.Tensor] = {}
    loader = build_loader(cfg, loaded.tokenizer, split)
    nll, count, batches, usage = 0.0, 0, 0, {}
    bar = tqdm(desc=f"perplexity ({split})", unit="batch", disable=os.environ.get("MEGAMEM_NO_PROGRESS") == "1")
    try:
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            ids, labels = batch["input_ids"], batch["labels"]
            if ours:
                out = model(ids, document_ids=batch.get("document_ids"))
                for layer, counts in out.chapter_usage.items():
                    usage[layer] = usage.get(layer, 0) + counts.detach().double().cpu()
                for layer, peer in peers.items():
                    experts[layer] = experts.get(layer, 0) + peer.expert_counts.double().cpu()
            else:
                out = model(input_ids=ids)
            logp = out.logits[:, :-1].float().log_softmax(-1)
            target = labels[:, 1:]
            keep = target != -100
            nll -= logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].double().sum().item()
            count += int(keep.sum())
            batches += 1
            bar.update(1)
    finally:
        bar.close()
        loader.close()
    if count == 0:
        raise ConfigError(f"the {split} split gave no labelled tokens to score: check the data (data.datasets / "
                          "training.eval_split) and --max-batches")
    loss = nll / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count, "batches": batches,
            "chapter_usage": {layer: c.tolist() for layer, c in sorted(usage.items())},
            "expert_usage": {layer: c.tolist() for layer, c in sorted(experts.items())}}
