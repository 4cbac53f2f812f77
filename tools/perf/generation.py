"""Decode tokens/s: megamem generate() (KV cache, memory K/V once per call) over transformers' generate()
on the same weights.

A memory model (layout B: the memory branch follows the MLP) is compared with transformers' Llama
holding the same base weights plus megamem's adapter hooks (megamem.adapter) holding the same memory
branches — the same computation, so both give the same greedy tokens (checked).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .models import build, hf_twin, megamem_config, random_ids
from .timing import alternate, speedup


def hf_model(ours, size: Dict[str, int], memory_tokens: Optional[int]) -> Tuple[torch.nn.Module, Callable]:
    """transformers' LlamaForCausalLM with `ours`' weights (and its memory branches, run by adapter hooks),
    and the context its generate() runs in (the adapter's decoding state, which keeps memory K/V)."""
    cfg = megamem_config(size)
    twin = build(cfg, torch.float32)
    state = ours.state_dict()
    twin.load_state_dict({k: v for k, v in state.items() if k in twin.state_dict()})
    hf = hf_twin(twin, cfg, torch.float32).eval()
    if memory_tokens is None:
        return hf, contextlib.nullcontext
    from megamem.adapter.model import AdapterModel

    adapter = AdapterModel(hf, _adapter_config(size, memory_tokens)).eval()
    mine = {k.replace("blocks.", "branches.", 1).replace(".memory.", ".", 1): v for k, v in state.items()
            if k.startswith("blocks.") and ".memory." in k}
    mine.update({k: v for k, v in state.items() if k.startswith("banks.")})
    missing, unexpected = adapter.load_state_dict(mine, strict=False)
    if unexpected or any(not k.startswith("base.") for k in missing):
        raise RuntimeError(f"memory weights did not map onto the adapter: {missing}, {unexpected}")
    return hf, adapter.decoding  # the hooks on hf run the adapter's branches


def _adapter_config(size, memory_tokens):
    return megamem_config(size, memory_tokens, memory_block_variant="B")


def run(size: Dict[str, int], memory_tokens: List[Optional[int]], iters: int, warmup: int) -> Dict:
    rows = []
    new = size["new_tokens"]
    prompt = random_ids(size["vocab"], size["gen_batch"], size["prompt"])
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    for n in memory_tokens:
        ours = build(_adapter_config(size, n) if n else megamem_config(size), torch.float32).eval()
        theirs, decoding = hf_model(ours, size, n)

        def hf_generate(theirs=theirs, decoding=decoding):
            with decoding():
                return theirs.generate(prompt, **kw)

        res = alternate({"megamem": lambda: ours.generate(prompt, new), "transformers": hf_generate}, iters, warmup)
        with torch.no_grad():  # same weights, same greedy tokens: the two did the same work
            same = torch.equal(ours.generate(prompt, new), hf_generate())
        tokens = new * prompt.shape[0]
        rows.append({"memory_tokens": n or 0, "batch": prompt.shape[0], "prompt": prompt.shape[1], "new_tokens": new,
                     "megamem_tokens_per_s": tokens / res["megamem"]["median_s"],
                     "transformers_tokens_per_s": tokens / res["transformers"]["median_s"],
                     "ratio": speedup(res, "megamem", "transformers"), "target": 1.0, "same_tokens": same})
        rows[-1]["met"] = rows[-1]["ratio"] >= 1.0
    return {"rows": rows, "hf_wrapper": wrapper_rows(size, memory_tokens[-1], iters, warmup)}


def wrapper_rows(size: Dict[str, int], memory_tokens: Optional[int], iters: int, warmup: int) -> List[Dict]:
    """Cost of an exported folder's generate() (MegamemForCausalLM: transformers' loop on megamem's KV cache)
    over MemoryTransformer.generate, same model, dense bank and sequence-routed chapters; same tokens checked."""
    from megamem.hf.modeling import MegamemForCausalLM

    new = size["new_tokens"]
    prompt = random_ids(size["vocab"], size["gen_batch"], size["prompt"])
    n = memory_tokens or 1024
    chapters = dict(use_chapters=True, num_chapters=16, top_k_chapters=2)
    rows = []
    for label, extra in (("dense bank", {}), ("chapters, sequence routing", chapters)):
        cfg = megamem_config(size, n, **extra)
        ours = build(cfg, torch.float32).eval()
        hf = MegamemForCausalLM.from_megamem(ours, cfg).eval()
        kw = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        res = alternate({"megamem": lambda: ours.generate(prompt, new), "hf": lambda: hf.generate(prompt, **kw)},
                        iters, warmup)
        with torch.no_grad():
            same = torch.equal(ours.generate(prompt, new), hf.generate(prompt, **kw))
        rows.append({"model": label, "memory_tokens": n, "hf_over_megamem_time": speedup(res, "megamem", "hf"),
                     "same_tokens": same})
    return rows
