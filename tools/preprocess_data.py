"""Tokenize a corpus once into memmap shards that the loader reads at ~zero CPU cost (data.shards).

    python tools/preprocess_data.py --input data/corpus/kjv/train.jsonl --tokenizer data/tokenizers/kjv-4096 \
        --out data/shards/kjv/train [--workers 2] [--text-field text] [--shard-tokens 100000000]

Each document is tokenized without special tokens and ends with eos, exactly as the streaming
pretraining path does, so shards and text give the same tokens. Documents keep their input order.
"""
import argparse
import itertools
import os
import sys
import time
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402
from megamem.config import ConfigError  # noqa: E402

_TOK = None


def _init(path):
    global _TOK
    from transformers import AutoTokenizer

    _TOK = AutoTokenizer.from_pretrained(path, local_files_only=True)


def _encode(texts):
    eos = _TOK.eos_token_id
    return [ids + [eos] for ids in _TOK(texts, add_special_tokens=False)["input_ids"]]


def _chunks(it, n):
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder")
    ap.add_argument("--out", required=True, help="split folder to write (index.json + shard_*.bin)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    args = ap.parse_args()
    from tqdm import tqdm

    from megamem.data.shards import ShardWriter
    from megamem.data.textfiles import iter_texts

    if not os.path.isdir(args.tokenizer):
        raise ConfigError(f"--tokenizer: folder not found: {args.tokenizer}")
    _init(args.tokenizer)
    from megamem.data.tokenizer import tokenizer_fingerprint

    writer = ShardWriter(args.out, len(_TOK), _TOK.eos_token_id, os.path.abspath(args.tokenizer), args.shard_tokens,
                         tokenizer_fingerprint(_TOK))
    start, docs, tokens = time.perf_counter(), 0, 0
    try:
        with Pool(args.workers, initializer=_init, initargs=(args.tokenizer,)) as pool, \
                tqdm(desc="tokenizing", unit="doc") as bar:
            for encoded in pool.imap(_encode, _chunks(iter_texts(args.input, args.text_field), 256)):
                writer.add(encoded)
                docs, tokens = docs + len(encoded), tokens + sum(map(len, encoded))
                bar.update(len(encoded))
        meta = writer.finish()
    except BaseException:
        writer.abort()
        raise
    took = time.perf_counter() - start
    print(f"{args.out}: {docs} documents, {tokens:,} tokens in {len(meta['shards'])} shard(s), "
          f"{tokens / took:,.0f} tokens/s with {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
