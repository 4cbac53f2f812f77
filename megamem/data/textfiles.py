"""Plain iteration over the text of local files (txt lines or jsonl/json/parquet/csv records) for tools
that read a corpus once, front to back (tokenizer training, shard preprocessing)."""
from __future__ import annotations

from typing import Iterator, List, Optional, Union

from ..config import ConfigError, DatasetSpec
from .instruction import BadRecord, record_content
from .sources import load_local, resolve_files


def iter_texts(paths: Union[str, List[str]], text_field: Union[str, List[str]] = "text",
               template: Optional[str] = None, sample_by: str = "line") -> Iterator[str]:
    files = resolve_files(paths, "input")
    ds, files, starts = load_local(files, DatasetSpec(path=paths, sample_by=sample_by), "input", None)
    f = 0
    for i, rec in enumerate(ds):
        while i >= starts[f + 1]:
            f += 1
        try:
            content = record_content(rec, text_field, template, f"{files[f]} record {i - int(starts[f]) + 1}")
        except BadRecord as e:
            raise ConfigError(str(e)) from None
        if isinstance(content, str) and content.strip():
            yield content
