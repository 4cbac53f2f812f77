"""Train a SentencePiece tokenizer (BPE or unigram) on local text; save a folder AutoTokenizer loads.

    python tools/train_tokenizer.py --input data/corpus/kjv/train.jsonl --out data/tokenizers/kjv-4096 \
        [--vocab-size 4096] [--model-type bpe|unigram] [--text-field text]

Ids: pad 0, bos 1, eos 2, unk 3 (the model config defaults); byte fallback, so any text round-trips;
a ChatML chat template (<|im_start|>/<|im_end|> are single tokens) for instruction data.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402
from megamem.data.textfiles import iter_texts  # noqa: E402
from megamem.data.tokenizer import train_sentencepiece  # noqa: E402


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="files or globs (txt, jsonl, json, parquet, csv)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    ap.add_argument("--text-field", default="text")
    args = ap.parse_args()
    texts = list(iter_texts(args.input, args.text_field))
    start = time.perf_counter()
    tok = train_sentencepiece(texts, args.out, args.vocab_size, args.model_type)
    took = time.perf_counter() - start
    print(f"{args.out}: {args.model_type} tokenizer, {len(tok)} tokens, trained on {len(texts)} documents "
          f"({sum(map(len, texts)) / 1e6:.1f}M chars) in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
