"""Decode memory and tokens/s vs context length: plain RoPE, a sliding window, a window + the attractor.

Three models of one shape (RoPE, vocab 256, no memory), side by side at each context length L:
`plain` (full causal attention), `window` (model.window_size = W: a ring of W keys/values per layer)
and `window_attractor` (the window plus the attractor state in the last layers, cross-attention read).
For each, in this process:

- memory: the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs after
  malloc_trim) above the resident size just before a fresh cache is filled with an L-token prompt
  (in chunks of `chunk` tokens) and `new_tokens` are decoded; and the bytes the decoding cache holds
  at the end (every layer's key/value tensors and, separately, the attractor state), read from the
  cache object: exact, with nothing timed.
- speed (after an untimed warm-up of each model): decode tokens/s = new_tokens / median time of decoding new_tokens greedily from that cache,
  the three models alternating (A B C C B A ...) after a warm-up (so the context grows by
  new_tokens per round: the cache holds L + new_tokens · (1 + warmup + iters) tokens at the end).

Ratios are each model's over `plain`'s at the same L.
"""
from __future__ import annotations

import ctypes
import gc
import json
from typing import Dict, List, Optional

import torch

from megamem.config import load_config
from megamem.model import build_model

from .timing import alternate

MODELS = ("plain", "window", "window_attractor")


def _config(size: Dict, name: str, max_len: int):
    over = {"model.vocab_size": 256, "model.hidden_dim": size["dim"], "model.intermediate_dim": size["inter"],
            "model.num_layers": size["layers"], "model.num_heads": size["heads"],
            "model.num_kv_heads": size["kv_heads"], "model.max_seq_len": max_len, "training.max_length": min(64, max_len),
            "model.dropout": 0.0, "model.attention_dropout": 0.0, "memory.vanilla_mode": True}
    if name != "plain":
        over["model.window_size"] = size["window"]
    if name == "window_attractor":
        a = size["attractor"]
        over.update({"model.attractor.use_attractor": True, "model.attractor.inject_layers": "last_N",
                     "model.attractor.N_inject": a["layers"], "model.attractor.d_state": a["d_state"],
                     "model.attractor.attractor_inject": "cross_attn"})
    return load_config(None, [f"--{k}={json.dumps(v)}" for k, v in over.items()])


def cache_bytes(cache) -> Dict[str, int]:
    """Bytes of the cache's tensors: every layer's keys and values, and every other state tensor."""
    kv = state = 0
    for layer in cache.layers.values():
        kv += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
        state += sum(t.numel() * t.element_size() for t in layer.state.values() if torch.is_tensor(t))
    return {"kv": kv, "state": state}


class PeakRSS:
    """Peak resident set size above a starting point (Linux: /proc/self/status; None elsewhere)."""

    def __init__(self):
        try:
            self._libc: Optional[ctypes.CDLL] = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.available = self._reset() and self._read("VmHWM") is not None

    @staticmethod
    def _read(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")), None)
        except OSError:
            return None

    def _reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            return True
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)  # freed heap pages go back, so reusing them counts as new
        self._reset()
        self.base = self._read("VmRSS")

    def delta(self) -> Optional[int]:
        return self._read("VmHWM") - self.base if self.available else None


def _decoder(model, cache, first: torch.Tensor, n: int):
    """A callable decoding n tokens greedily from the cache (each call continues where the last stopped)."""
    state = {"next": first}

    @torch.no_grad()
    def decode():
        tok = state["next"]
        for _ in range(n):
            tok = model(tok, cache=cache, last_logits_only=True).logits[:, -1].argmax(-1, keepdim=True)
        state["next"] = tok
    return decode


@torch.no_grad()
def _prefill(model, cache, prompt: torch.Tensor, chunk: int) -> torch.Tensor:
    for start in range(0, prompt.shape[1], chunk):
        logits = model(prompt[:, start:start + chunk], cache=cache, last_logits_only=True).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def run(size: Dict, iters: int, warmup: int) -> Dict:
    n, contexts = size["new_tokens"], size["contexts"]
    rounds = 1 + warmup + iters
    max_len = max(contexts) + n * rounds
    models = {}
    for name in MODELS:
        torch.manual_seed(0)
        models[name] = build_model(_config(size, name, max_len)).eval()
    for model in models.values():  # one-time costs (first kernels, allocator arenas) before anything is measured
        warm = model.new_cache(1, 2 * size["chunk"] + 1)
        _decoder(model, warm, _prefill(model, warm, torch.zeros(1, 2 * size["chunk"], dtype=torch.long), size["chunk"]), 1)()
    rss, rows = PeakRSS(), []
    for ctx in contexts:
        prompt = torch.randint(0, 256, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        total = ctx + n * rounds
        caches, fns, per = {}, {}, {}
        for name, model in models.items():
            rss.start()
            caches[name] = model.new_cache(1, total, total)
            decode = _decoder(model, caches[name], _prefill(model, caches[name], prompt, size["chunk"]), n)
            decode()
            per[name] = {"peak_rss_delta_bytes": rss.delta()}
            fns[name] = decode
        timed = alternate(fns, iters, warmup)
        for name in MODELS:
            b = cache_bytes(caches[name])
            per[name].update(kv_cache_bytes=b["kv"], state_bytes=b["state"], cache_bytes=b["kv"] + b["state"],
                             cache_tokens=caches[name].length,
                             tokens_per_s=n / max(timed[name]["median_s"], 1e-9))
        for name in MODELS:
            p, plain = per[name], per["plain"]
            p["cache_bytes_vs_plain"] = p["cache_bytes"] / plain["cache_bytes"]
            p["tokens_per_s_vs_plain"] = p["tokens_per_s"] / plain["tokens_per_s"]
            both = p["peak_rss_delta_bytes"], plain["peak_rss_delta_bytes"]
            p["peak_rss_vs_plain"] = both[0] / both[1] if None not in both and both[1] > 0 else None
            rows.append({"context": ctx, "model": name, **p})
        del caches, fns
    return {"rows": rows, "window": size["window"], "new_tokens": n, "chunk": size["chunk"],
            "shape": {k: size[k] for k in ("dim", "inter", "layers", "heads", "kv_heads")},
            "attractor": size["attractor"], "dtype": "fp32",
            "peak_rss": "VmHWM − VmRSS (Linux /proc, reset per model)" if rss.available else
            "unavailable (needs Linux /proc/self/clear_refs): peak_rss_delta_bytes is null"}


def table(res: Dict) -> str:
    """The side-by-side table: one row per context length and model."""
    mib = 2.0 ** 20

    def ratio(x):
        return "" if x is None else f"{x:.2f}"

    lines = ["| context | model | cache tokens | KV cache (MiB) | attractor state (MiB) | cache × plain | "
             "peak RSS Δ (MiB) | × plain | decode tok/s | × plain |", "|" + "---|" * 10]
    for r in res["rows"]:
        rss = r["peak_rss_delta_bytes"]
        lines.append(f"| {r['context']:,} | {r['model']} | {r['cache_tokens']:,} | {r['kv_cache_bytes'] / mib:.2f} | "
                     f"{r['state_bytes'] / mib:.2f} | {ratio(r['cache_bytes_vs_plain'])} | "
                     f"{'' if rss is None else f'{rss / mib:.1f}'} | {ratio(r['peak_rss_vs_plain'])} | "
                     f"{r['tokens_per_s']:.1f} | {ratio(r['tokens_per_s_vs_plain'])} |")
    return "\n".join(lines)


def plot(res: Dict, path: str) -> str:
    import matplotlib.pyplot as plt

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for name in MODELS:
        rows = [r for r in res["rows"] if r["model"] == name]
        x = [r["context"] for r in rows]
        line, = mem.plot(x, [r["cache_bytes"] / 2 ** 20 for r in rows], "o-", label=f"{name}: cache")
        if all(r["peak_rss_delta_bytes"] is not None for r in rows):
            mem.plot(x, [r["peak_rss_delta_bytes"] / 2 ** 20 for r in rows], "s--", color=line.get_color(),
                     label=f"{name}: peak RSS Δ")
        speed.plot(x, [r["tokens_per_s"] for r in rows], "o-", label=name)
    contexts = sorted({r["context"] for r in res["rows"]})
    for ax in (mem, speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
        ax.minorticks_off()
    mem.set(yscale="log", xlabel="context length (tokens)", ylabel="MiB", title=f"decode memory (window {res['window']})")
    speed.set(xlabel="context length (tokens)", ylabel="decode tokens/s", title="decode speed (1 thread)")
    mem.legend(fontsize=7)
    speed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
