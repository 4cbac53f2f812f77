#!/usr/bin/env python
"""megamem performance, as ratios of two things measured side by side (not a test).

    python tools/benchmark.py                  # every sub-benchmark, the targets' model with small batches (~30 min on a busy 2-core machine)
    python tools/benchmark.py --quick          # tiny sizes, one iteration each (what tests/test_benchmark.py runs)
    python tools/benchmark.py --full           # the sizes of the performance targets (slow on CPU: bf16 HF steps)
    python tools/benchmark.py --only vanilla generation --json out.json

Every number is a ratio of two medians timed in this process, alternating (A B B A ...) after a
warm-up, with the same torch.set_num_threads for both sides; with one thread the time is CPU time.
Sub-benchmarks: vanilla (train tokens/s vs transformers Llama), memory (achieved FLOP/s of memory
models vs vanilla), chapters (step time vs bank size), mfu (achieved FLOP/s over a matmul peak
measured here), generation (generate() vs transformers generate()), distributed (2 gloo ranks:
ZeRO-3, bank gather, expert-parallel all-to-all), peer_mla (PEER vs a dense MLP of the same active
neurons: step time and loss; MLA vs GQA: KV-cache bytes per token and decode tokens/s), window_attractor
(decode memory and tokens/s vs context length: plain RoPE, a sliding window, window + attractor; its own
table too), routed_rows (sequence-routed chapters vs a dense bank of the rows they attend, fp32 and bf16),
bf16_engine (DeepSpeed's bf16 engine with fp32 master weights vs the bf16-cast model and transformers).
Writes JSON (--json) and PNG plots (--plot-dir).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# model shapes: the performance targets' (vocab 8192, hidden 512, 8 heads, 4 kv heads, 6 layers); smaller batches by default
MODEL = dict(vocab=8192, dim=512, inter=1376, layers=6, heads=8, kv_heads=4, seq=256)
# PEER vs dense MLP (same active neurons: 4 heads × 16 experts) and MLA vs GQA decoding at 1k/4k context
PEER_MLA = dict(dim=256, layers=4, heads=8, kv_heads=4, seq=128, batch=4, max_len=4128, lr=3e-3, steps=120,
                peer=dict(keys=128, heads=4, k=16, he=1, query_dim=64), contexts=[1024, 4096], new_tokens=16,
                mla=dict(kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32))
# decoding at growing context: plain RoPE vs window W vs window + attractor (last `layers` layers, d_state rows)
WINDOW_ATTRACTOR = dict(dim=256, inter=688, layers=4, heads=8, kv_heads=4, window=512, chunk=256, new_tokens=32,
                        contexts=[256, 512, 1024, 2048, 4096, 8192], attractor=dict(layers=2, d_state=64))
# sequence-routed chapters (k = 8 chapters of 256 rows per sequence, row-sparse bank updates) vs a dense bank of
# the 2,048 rows they attend, memory in every layer of the targets' model at batch 8; 1M rows at memory_dim 128
ROUTED_ROWS = dict(MODEL, batch=8, chapter=256, k=8, banks=[16_384, 131_072],
                   small_dim=dict(memory_dim=128, banks=[1_048_576]))
SIZES = {
    "quick": dict(model=dict(vocab=256, dim=64, inter=96, layers=2, heads=4, kv_heads=2, seq=32, batch=2),
                  banks=[64, 256], gen=dict(new_tokens=4, gen_batch=1, prompt=8), gen_memory=64,
                  chapters=dict(batch=2, seq=32, dim=32, heads=2, k=2, chapter=16, vocab=128, steps=1),
                  chapter_banks=[256, 1024],
                  dist=dict(vocab=256, dim=64, inter=96, layers=2, heads=4, kv_heads=2, seq=32, batch=2,
                            memory_tokens=256, chapter_tokens=512, chapters=16, top_k=2),
                  peer_mla=dict(dim=32, layers=2, heads=4, kv_heads=2, seq=16, batch=2, max_len=80, lr=3e-3, steps=3,
                                peer=dict(keys=8, heads=2, k=4, he=1, query_dim=8), contexts=[32, 64], new_tokens=3,
                                mla=dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)),
                  window_attractor=dict(dim=32, inter=48, layers=2, heads=4, kv_heads=2, window=16, chunk=8,
                                        new_tokens=2, contexts=[4, 12, 48], attractor=dict(layers=1, d_state=8)),
                  routed_rows=dict(vocab=256, dim=32, inter=48, layers=2, heads=4, kv_heads=2, seq=16, batch=2,
                                   chapter=8, k=2, banks=[64, 256], small_dim=dict(memory_dim=16, banks=[1024])),
                  iters=1, warmup=1),
    "default": dict(model=dict(MODEL, batch=2, batch_bf16=1, batch_memory=1), banks=[1024, 4096, 16384],
                    gen=dict(new_tokens=64, gen_batch=1, prompt=32), gen_memory=4096,
                    chapters=None, chapter_banks=[16_384, 131_072, 1_048_576],
                    dist=dict(vocab=8192, dim=256, inter=688, layers=4, heads=8, kv_heads=4, seq=128, batch=2,
                              memory_tokens=4096, chapter_tokens=65_536, chapters=256, top_k=8),
                    peer_mla=PEER_MLA, window_attractor=WINDOW_ATTRACTOR, routed_rows=ROUTED_ROWS, iters=3, warmup=1),
    "full": dict(model=dict(MODEL, batch=8), banks=[1024, 4096, 16384],
                 gen=dict(new_tokens=128, gen_batch=1, prompt=64), gen_memory=16384,
                 chapters=None, chapter_banks=[16_384, 131_072, 1_048_576],
                 dist=dict(MODEL, batch=4, memory_tokens=16384, chapter_tokens=1_048_576, chapters=4096, top_k=8),
                 peer_mla=dict(PEER_MLA, steps=400, contexts=[1024, 4096, 16384], max_len=16416),
                 window_attractor=dict(WINDOW_ATTRACTOR, new_tokens=64, contexts=[256, 1024, 4096, 16384, 32768]),
                 routed_rows=ROUTED_ROWS, iters=5, warmup=1),
}
ALL = ["vanilla", "memory", "chapters", "mfu", "generation", "distributed", "peer_mla", "window_attractor",
       "routed_rows", "bf16_engine"]


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from megamem.ops import cpu_has_native_bf16

    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_native_bf16_gemm": cpu_has_native_bf16()}
    if torch.cuda.is_available():
        from megamem.model.attention.mha import _HAS_FLASH_ATTN

        info.update(gpu=torch.cuda.get_device_name(0), flash_attn=_HAS_FLASH_ATTN)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def run(only, level: str = "default", iters=None, warmup=None, threads: int = 1, device: str = "cpu",
        compile_model: bool = False, chapter_modes=("sequence-sparse", "token-sparse"), partial_json=None) -> dict:
    """Run the selected sub-benchmarks; returns the JSON-able results (also written to partial_json
    after each sub-benchmark, so a long run that is stopped keeps what it measured)."""
    import torch

    torch.set_num_threads(threads)
    s = SIZES[level]
    it, wu = iters or s["iters"], s["warmup"] if warmup is None else warmup
    out = {"level": level, "iters": it, "warmup": wu, "machine": machine(), "results": {}}
    m = s["model"]
    for name in only:
        print(f"[benchmark] {name} ...", file=sys.stderr, flush=True)
        if name == "vanilla":
            from perf import vanilla

            res = vanilla.run(m, ["fp32", "bf16"], it, wu, compile_model=compile_model)
        elif name == "memory":
            from perf.efficiency import memory_efficiency

            res = memory_efficiency(m, s["banks"], it, wu, ["fp32", "bf16"])
        elif name == "chapters":
            import bench_chapters
            from perf import chapters

            p = s["chapters"] or (bench_chapters.FULL if level == "full" else bench_chapters.SMALL)
            res = chapters.run(p, s["chapter_banks"], list(chapter_modes), it, wu)
        elif name == "mfu":
            from perf.efficiency import mfu

            dtypes = ["bf16"] if device == "cuda" else ["fp32", "bf16"]
            res = mfu(m, dtypes, it, wu, device=device, peak_n=8192 if device == "cuda" else 1024)
        elif name == "generation":
            from perf import generation

            res = generation.run(dict(m, **s["gen"]), [None, s["gen_memory"]], it, wu)
        elif name == "distributed":
            from perf import distributed

            res = distributed.run(s["dist"], it, wu)
        elif name == "peer_mla":
            from perf import peer_mla

            res = peer_mla.run(s["peer_mla"], it, wu)
        elif name == "window_attractor":
            from perf import window_attractor

            res = window_attractor.run(s["window_attractor"], it, wu)
        elif name == "routed_rows":
            from perf import routed_rows

            res = routed_rows.run(s["routed_rows"], ["fp32", "bf16"], it, wu)
        elif name == "bf16_engine":
            from perf import bf16_engine

            res = bf16_engine.run(m, [0, 1], it, wu)
        else:
            raise SystemExit(f"unknown sub-benchmark {name!r}; valid: {', '.join(ALL)}")
        out["results"][name] = res
        print(json.dumps({name: res}, default=str), file=sys.stderr, flush=True)
        if partial_json:
            _write(partial_json, out)
    torch.set_num_threads(threads)
    return out


def _write(path: str, out: dict) -> None:
    from megamem.folders import write_json_file

    write_json_file(path, out)


def _fmt(x, nd=2) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def table(out: dict) -> str:
    """One markdown row per measured ratio: what, ratio, target, met."""
    rows, r = [], out["results"]
    for v in r.get("vanilla", {}).get("rows", []):
        rows.append((f"train tokens/s, megamem vanilla / transformers Llama, {v['dtype']} (batch {v['batch']}×{v['seq']})",
                     v["ratio"], f"≥ {v['target']}", v["met"]))
    for v in r.get("memory", {}).get("rows", []):
        rows.append((f"achieved FLOP/s, memory model N_m={v['memory_tokens']:,} every layer / vanilla, {v['dtype']} "
                     f"({v['gflops']:.1f} / {v['vanilla_gflops']:.1f} GFLOP/s; step {v['step_s'] * 1e3:.0f} ms, "
                     f"batch {v['batch']})", v["ratio"], "≥ 0.9", v["met"]))
    for v in r.get("chapters", {}).get("rows", []):
        rows.append((f"step time, {v['mode']} routing, {v['memory_tokens']:,} memory tokens / smallest bank "
                     f"(/ dense at smallest: {v['vs_dense_smallest_bank']:.2f})", v["vs_smallest_bank"],
                     "≤ 1.2" if "target" in v else "", v.get("met", "")))
    for v in r.get("mfu", {}).get("rows", []):
        rows.append((f"MFU {v['dtype']} on {v['device']} ({v['achieved_gflops']:.1f} / {v['peak_gflops']:.1f} GFLOP/s "
                     f"matmul peak measured here)", v["mfu"], "", ""))
    for v in r.get("generation", {}).get("rows", []):
        what = "vanilla" if not v["memory_tokens"] else f"memory N_m={v['memory_tokens']:,} (layout B, HF via adapter hooks)"
        rows.append((f"generate() tokens/s, megamem / transformers, {what}, same tokens: {v['same_tokens']}",
                     v["ratio"], "≥ 1.0", v["met"]))
    for v in r.get("generation", {}).get("hf_wrapper", []):
        rows.append((f"generate() time, exported HF folder (transformers' loop) / megamem, {v['model']} "
                     f"N_m={v['memory_tokens']:,}, same tokens: {v['same_tokens']}", v["hf_over_megamem_time"], "", ""))
    d = r.get("distributed")
    if d:
        z, e = d["zero3"], d["expert_parallel"]
        rows.append((f"speed-up of 2 ranks ZeRO-3 over 1 rank, same global batch {z['global_batch']}×{z['seq']}, "
                     f"N_m={z['memory_tokens']:,}", z["speedup_2_ranks_zero3"], "", ""))
        rows.append(("step time ZeRO-3 / ZeRO-0, 2 ranks", z["zero3_over_zero0"], "", ""))
        rows.append(("bank all-gathers (fwd + bwd) / ZeRO-3 step time", z["bank_gather_fraction_of_zero3_step"], "", ""))
        rows.append((f"chapters, token routing fwd+bwd, ep_size 2 / ep_size 1 ({e['chapters']} chapters, "
                     f"{e['memory_tokens']:,} tokens)", e["ep2_over_ep1"], "", ""))
    pm = r.get("peer_mla")
    if pm:
        p = pm["peer"]
        for v in p["rows"][1:]:
            sparse = ", sparse tables" if v["model"] == "peer_sparse" else ""
            rows.append((f"step time, PEER{sparse} ({p['experts']:,} experts) / dense MLP of {p['active_neurons']} "
                         f"neurons ({p['steps']} steps, {p['data']}; last-quarter loss {v['final_loss']:.3f} vs "
                         f"{p['rows'][0]['final_loss']:.3f})", v["vs_dense_mlp"], "", ""))
        for v in pm["mla"]["rows"]:
            rows.append((f"decode tokens/s, MLA / GQA at {v['context']:,} context ({v['mla_tokens_per_s']:.1f} / "
                         f"{v['gqa_tokens_per_s']:.1f})", v["mla_over_gqa_tokens_per_s"], "", ""))
            rows.append((f"KV-cache bytes per token, MLA / GQA ({v['mla_cache_bytes_per_token']:.0f} / "
                         f"{v['gqa_cache_bytes_per_token']:.0f})", v["mla_over_gqa_cache_bytes"], "", ""))
    wa = r.get("window_attractor")
    for v in (wa or {}).get("rows", []):
        if v["model"] == "plain":
            continue
        what = f"window {wa['window']}" + (" + attractor" if v["model"] == "window_attractor" else "")
        plain = next(p for p in wa["rows"] if p["context"] == v["context"] and p["model"] == "plain")
        rows.append((f"decode tokens/s, {what} / plain RoPE at {v['context']:,} context ({v['tokens_per_s']:.1f} / "
                     f"{plain['tokens_per_s']:.1f})", v["tokens_per_s_vs_plain"], "", ""))
        rss = "" if v["peak_rss_vs_plain"] is None else f"; peak RSS Δ {v['peak_rss_vs_plain']:.2f}× plain"
        rows.append((f"decode cache bytes, {what} / plain RoPE at {v['context']:,} context ({v['cache_bytes']:,} / "
                     f"{plain['cache_bytes']:,}{rss})", v["cache_bytes_vs_plain"], "", ""))
    for v in r.get("routed_rows", {}).get("rows", []):
        rows.append((f"step time, sequence-routed {v['memory_tokens']:,}-row bank ({v['chapters']:,} chapters, width "
                     f"{v['memory_dim']}, {v['distinct_chapters_per_layer']:.1f} distinct of {v['picks_per_layer']} picks "
                     f"per layer) / dense {v['attended_rows']:,}-row bank, {v['dtype']}", v["vs_dense_attended"],
                     f"≤ {v['target']}", v["met"]))
    for v in r.get("bf16_engine", {}).get("rows", []):
        if v["system"].startswith("engine"):
            rows.append((f"train tokens/s, DeepSpeed bf16 engine ({v['system'].split('_')[1]}: fp32 master weights) / "
                         f"bf16-cast model, vanilla (batch {v['batch']}×{v['seq']}; / transformers cast: "
                         f"{v['vs_transformers']:.2f})", v["vs_cast"], "", ""))
    lines = ["| measurement | ratio | target | met |", "|---|---|---|---|"]
    lines += [f"| {w} | {_fmt(x)} | {t} | {'yes' if m is True else 'no' if m is False else ''} |" for w, x, t, m in rows]
    return "\n".join(lines)


def plots(out: dict, directory: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    made = []
    ch = out["results"].get("chapters")
    if ch:
        fig, ax = plt.subplots(figsize=(5, 4))
        for mode in dict.fromkeys(r["mode"] for r in ch["rows"]):
            pts = [r for r in ch["rows"] if r["mode"] == mode]
            ax.plot([r["memory_tokens"] for r in pts], [r["vs_smallest_bank"] for r in pts], "o-", label=mode)
        ax.axhline(1.2, ls="--", c="gray", label="target 1.2×")
        ax.set(xscale="log", xlabel="memory tokens", ylabel="step time / smallest bank", title="chapter scaling")
        ax.legend()
        made.append(os.path.join(directory, "chapters.png"))
        fig.tight_layout()
        fig.savefig(made[-1], dpi=110)
    mem = out["results"].get("memory")
    if mem:
        fig, ax = plt.subplots(figsize=(5, 4))
        for dtype in dict.fromkeys(r.get("dtype", "fp32") for r in mem["rows"]):
            pts = [r for r in mem["rows"] if r.get("dtype", "fp32") == dtype]
            ax.plot([r["memory_tokens"] for r in pts], [r["ratio"] for r in pts], "o-", label=dtype)
        ax.axhline(0.9, ls="--", c="gray", label="target 0.9")
        ax.set(xscale="log", xlabel="memory tokens (every layer)", ylabel="FLOP/s / vanilla FLOP/s",
               title="memory-attention efficiency")
        ax.legend()
        made.append(os.path.join(directory, "memory_efficiency.png"))
        fig.tight_layout()
        fig.savefig(made[-1], dpi=110)
    if out["results"].get("window_attractor"):
        from perf import window_attractor

        made.append(window_attractor.plot(out["results"]["window_attractor"],
                                          os.path.join(directory, "window_attractor.png")))
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--only", nargs="+", choices=ALL, default=ALL, help="sub-benchmarks to run (default: all)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes, one iteration (smoke test)")
    size.add_argument("--full", action="store_true", help="the target sizes (batch 8×256; slow on CPU)")
    ap.add_argument("--iters", type=int, help="timed rounds per comparison (default 3, --full 5, --quick 1)")
    ap.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: MFU in bf16 with flash-attn when installed (GPU machines only)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the megamem model in `vanilla`")
    ap.add_argument("--chapter-modes", nargs="+", default=["sequence-sparse", "token-sparse"],
                    choices=["sequence", "sequence-sparse", "token", "token-sparse", "token-absorbed"],
                    help="routing modes of `chapters` (-sparse: row-sparse bank gradient and AdamW, "
                         "memory.sparse_bank_grad)")
    ap.add_argument("--json", default="benchmark.json", help="where to write the results")
    ap.add_argument("--plot-dir", default="benchmark_plots", help="where to write PNG plots ('' = none)")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is visible to torch")
        if set(args.only) - {"mfu"}:
            ap.error("--device cuda runs only the mfu sub-benchmark: add --only mfu")
    if args.iters is not None and args.iters < 1:
        ap.error(f"--iters must be ≥ 1, got {args.iters}")
    level = "quick" if args.quick else "full" if args.full else "default"
    out = run(args.only, level, args.iters, args.warmup, args.threads, args.device, args.compile,
              args.chapter_modes, partial_json=args.json)
    text = table(out)
    if out["results"].get("window_attractor"):
        from perf import window_attractor

        text += "\n\n" + window_attractor.table(out["results"]["window_attractor"])
    print(f"# {out['machine']['cpu']}, {out['machine']['threads']} thread(s), torch {out['machine']['torch']}, "
          f"sizes: {level}\n\n{text}")
    out["table"] = text
    if args.plot_dir:
        out["plots"] = plots(out, args.plot_dir)
    _write(args.json, out)
    print(f"\nresults: {args.json}" + (f", plots: {', '.join(out['plots'])}" if out.get("plots") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
