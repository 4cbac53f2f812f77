#!/usr/bin/env python
"""Cost of transformers' generate() over megamem's own generate() on the same model (not a test).

    python tools/bench_hf_generate.py [--new-tokens 64] [--repeats 7]

A small memory model (dense bank, and a chapter model with sequence routing) generates greedily
with MemoryTransformer.generate and with MegamemForCausalLM.generate (transformers' loop on
megamem's KV cache), alternating, after a warm-up; prints the median of each and their ratio.
Both produce the same tokens (checked). Process CPU time, one thread, so other load matters less.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    import torch

    from megamem.config import load_config
    from megamem.hf.modeling import MegamemForCausalLM
    from megamem.model import build_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = ["--model.hidden_dim=256", "--model.num_heads=4", "--model.num_layers=4", "--model.intermediate_dim=688",
            "--model.vocab_size=4096", "--model.max_seq_len=256", "--training.max_length=256",
            "--memory.num_memory_tokens=1024", "--memory.wo_init_zero=false"]
    variants = {"dense bank": [], "chapters (sequence)": ["--memory.use_chapters=true", "--memory.num_chapters=16",
                                                          "--memory.top_k_chapters=2"]}
    print(f"{'model':<22}{'megamem s':>12}{'transformers s':>16}{'ratio':>8}")
    for name, extra in variants.items():
        torch.manual_seed(0)
        cfg = load_config(None, base + extra)
        model = build_model(cfg).eval()
        hf = MegamemForCausalLM.from_megamem(model, cfg).eval()
        ids = torch.randint(3, 4096, (1, 32))
        run = {"megamem": lambda: model.generate(ids, args.new_tokens),
               "hf": lambda: hf.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)}
        assert torch.equal(run["megamem"](), run["hf"]())  # warm-up, and the same tokens
        times = {k: [] for k in run}
        for _ in range(args.repeats):
            for k, fn in run.items():
                start = time.process_time()
                fn()
                times[k].append(time.process_time() - start)
        a, b = statistics.median(times["megamem"]), statistics.median(times["hf"])
        print(f"{name:<22}{a:>12.3f}{b:>16.3f}{b / a:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
