"""Loader throughput on this machine: streaming tokenization vs pre-tokenized shards, side by side.

    python tools/bench_data.py [--batches 200] [--max-length 256] [--batch-size 8]

Prepares the embedded corpus, a 4,096-token tokenizer and shards under data/ when missing, then
times the train loader (tokens yielded per second) for each source kind; prints a Markdown table.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megamem.cli import run_cli  # noqa: E402
from megamem.config import load_config  # noqa: E402


def _ensure(corpus, tok_dir, shard_dir):
    from megamem.data.corpus import prepare_corpus

    prepare_corpus(corpus, progress=False)
    tools = os.path.join(ROOT, "tools")
    if not os.path.isdir(tok_dir):
        subprocess.run([sys.executable, f"{tools}/train_tokenizer.py", "--input", f"{corpus}/train.jsonl",
                        "--out", tok_dir], check=True)
    if not os.path.isfile(os.path.join(shard_dir, "train", "index.json")):
        subprocess.run([sys.executable, f"{tools}/preprocess_data.py", "--input", f"{corpus}/train.jsonl",
                        "--tokenizer", tok_dir, "--out", f"{shard_dir}/train"], check=True)


def _time(cfg, tok, batches):
    from megamem.data import build_loader

    loader = build_loader(cfg, tok)
    next(loader)  # start-up (file loading, first batch) is not throughput
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(loader)["input_ids"].numel()
    took = time.perf_counter() - start
    loader.close()
    return n / took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--data", default=os.path.join(ROOT, "data"))
    args = ap.parse_args()
    corpus, tok_dir, shard_dir = (f"{args.data}/corpus/kjv", f"{args.data}/tokenizers/kjv-4096",
                                  f"{args.data}/shards/kjv")
    _ensure(corpus, tok_dir, shard_dir)
    from megamem.data import load_tokenizer

    base = [f"--model.tokenizer_name={tok_dir}", "--model.vocab_size=4096", "--model.max_seq_len=2048",
            f"--training.max_length={args.max_length}", f"--training.batch_size={args.batch_size}"]
    runs = [("text, map-style (jsonl → Arrow), tokenized on the fly", [f"--training.dataset_name={corpus}/train.jsonl"]),
            ("text, streaming (jsonl), tokenized on the fly",
             [f"--data.datasets=[{{path: {corpus}/train.jsonl, streaming: true}}]"]),
            ("pre-tokenized memmap shards", [f"--data.shards={shard_dir}"])]
    print("| source | workers | tokens/s |\n|---|---|---|")
    for name, extra in runs:
        for workers in (0, 1):
            cfg = load_config(None, base + extra + [f"--data.num_workers={workers}"])
            tok = load_tokenizer(cfg)
            print(f"| {name} | {'prefetch thread' if workers else 'inline'} | {_time(cfg, tok, args.batches):,.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
