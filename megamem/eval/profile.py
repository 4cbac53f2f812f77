"""Memory and throughput per context length (scripts/eval.py --benchmarks profile), megamem models.

At each length: prefill tokens/s (one forward over the prompt into a fresh decoding cache), decode
tokens/s (greedy steps after it), the bytes the decoding cache holds after decoding (its K/V and
per-branch state tensors), peak RSS above the start (CPU, sampled with psutil) and peak CUDA memory
(GPU). "Flat memory" is measured, not assumed: `cache_flat` says whether the cache's bytes are the
same at every length (a sliding window, model.window_size, keeps a ring of window slots).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, Sequence

import torch

from ..config import ConfigError
from ..folders import write_figure


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in obj (tensors, and dicts/lists/tuples of them), each storage once."""
    seen, total, todo = set(), 0, [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return total


def cache_bytes(cache) -> int:
    """Bytes a DecodingCache holds per layer (K/V and each branch's state; the banks are not counted)."""
    return tensor_bytes([[layer.keys, layer.values, layer.state] for layer in cache.layers.values()])


class _PeakRSS:
    """Peak resident memory of this process above its level at start, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def bytes(self) -> int:
        return self.peak - self.start


@torch.no_grad()
def profile_model(model, lengths: Sequence[int], decode_tokens: int, seed: int = 0) -> Dict[str, Any]:
    """{"lengths": {n: {prefill_tokens_per_s, decode_tokens_per_s, cache_bytes, peak_rss_bytes[, peak_cuda_bytes]}},
    "cache_flat": bool, "window_size": ...} for a MemoryTransformer."""
    if model is None or not hasattr(model, "new_cache"):
        raise ConfigError("--benchmarks profile measures megamem models (exports, checkpoints, megamem HF folders)")
    limit = model.model_config.max_seq_len
    for n in lengths:
        if n + decode_tokens > limit:
            raise ConfigError(f"evaluation.profile_lengths {n}: with {decode_tokens} decoded tokens it passes the "
                              f"model's max_seq_len {limit}")
    model.eval()
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    rows: Dict[str, Dict[str, float]] = {}
    for n in lengths:
        ids = torch.randint(0, model.model_config.vocab_size, (1, n), generator=gen).to(device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        with _PeakRSS() as rss:
            cache = model.new_cache(1, n + decode_tokens)
            t0 = time.perf_counter()
            logits = model(ids, cache=cache, last_logits_only=True).logits[:, -1]
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(decode_tokens):
                logits = model(logits.argmax(-1)[:, None], cache=cache, last_logits_only=True).logits[:, -1]
            if cuda:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
        row = {"prefill_tokens_per_s": n / (t1 - t0), "decode_tokens_per_s": decode_tokens / max(t2 - t1, 1e-9),
               "cache_bytes": cache_bytes(cache), "peak_rss_bytes": rss.bytes}
        if cuda:
            row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        rows[str(n)] = row
        del cache
    sizes = {r["cache_bytes"] for r in rows.values()}
    return {"lengths": rows, "decode_tokens": decode_tokens, "window_size": model.model_config.window_size,
            "cache_flat": len(sizes) == 1}


def plot_profile(result: Dict[str, Any], path: str) -> str:
    """Tokens/s and memory (MiB) against context length, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in result["lengths"]]
    rows = list(result["lengths"].values())
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, label in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")):
        a.plot(ns, [r[key] for r in rows], marker="o", label=label)
    a.set(xlabel="context length (tokens)", ylabel="tokens/s", title="throughput")
    a.legend()
    for key, label in (("cache_bytes", "decoding cache"), ("peak_rss_bytes", "peak RSS"),
                       ("peak_cuda_bytes", "peak CUDA")):
        if key in rows[0]:
            b.plot(ns, [r[key] / 2**20 for r in rows], marker="o", label=label)
    b.set(xlabel="context length (tokens)", ylabel="MiB", title="memory")
    b.legend()
    fig.tight_layout()
    return write_figure(fig, path, dpi=100)
