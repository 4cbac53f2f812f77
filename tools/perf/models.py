"""Models the benchmarks compare: megamem from a size dict, and its transformers Llama twin."""
from __future__ import annotations

import json
from typing import Dict, Optional

import torch

from megamem.config import load_config
from megamem.hf.llama import llama_config, to_llama_state_dict
from megamem.model import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def megamem_config(size: Dict[str, int], memory_tokens: Optional[int] = None, **memory):
    """size: vocab, dim, inter, layers, heads, kv_heads, seq. memory_tokens None = vanilla mode;
    otherwise a dense bank in every layer (extra `memory.*` keys in **memory)."""
    over = {"model.vocab_size": size["vocab"], "model.hidden_dim": size["dim"], "model.intermediate_dim": size["inter"],
            "model.num_layers": size["layers"], "model.num_heads": size["heads"], "model.num_kv_heads": size["kv_heads"],
            "model.max_seq_len": size["seq"] + size.get("new_tokens", 0), "training.max_length": size["seq"],
            "model.dropout": 0.0, "model.attention_dropout": 0.0}
    if memory_tokens is None:
        over["memory.vanilla_mode"] = True
    else:
        over.update({"memory.num_memory_tokens": memory_tokens, "memory.memory_layer_placement": "all",
                     "memory.wo_init_zero": False, "memory.memory_dropout": 0.0})
        over.update({f"memory.{k}": v for k, v in memory.items()})
    return load_config(None, [f"--{k}={json.dumps(v)}" for k, v in over.items()])


def build(cfg, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype)


def hf_twin(model, cfg, dtype: torch.dtype):
    """transformers.LlamaForCausalLM (SDPA attention) holding exactly the vanilla model's weights."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(cfg)).to(dtype)
    hf.config._attn_implementation = "sdpa"
    missing, unexpected = hf.load_state_dict(to_llama_state_dict(model.state_dict(), cfg), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights did not map onto Llama: missing {missing}, unexpected {unexpected}")
    return hf


def train_step(model, ids: torch.Tensor, hf: bool = False):
    """One forward + backward + fused AdamW step; returns a callable for `alternate`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    model.train()

    def step():
        out = model(input_ids=ids, labels=ids) if hf else model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def random_ids(vocab: int, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
