"""Prepare the embedded offline corpus (KJV, public domain) under data/corpus/kjv.

    python tools/prepare_corpus.py [--out data/corpus/kjv] [--force]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamem.cli import ArgumentParser, run_cli  # noqa: E402
from megamem.data.corpus import prepare_corpus  # noqa: E402


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/corpus/kjv")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = ap.parse_args()
    counts = prepare_corpus(args.out, progress=True, force=args.force)
    print(f"{args.out}: {counts['train']} train and {counts['validation']} validation documents (see LICENSE.md)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
