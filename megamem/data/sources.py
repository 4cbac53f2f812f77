"""Document sources with an exact, JSON-able position: hub datasets and local files via `datasets`.

A source's state is {epoch, pos, skipped}: `pos` counts records this rank has consumed in this
epoch. Map-style sources (local files by default) seek in O(1) through a seeded permutation;
streaming sources re-read (not re-tokenize) `pos` records of the epoch's deterministic order.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections import Counter
from itertools import islice
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from ..config import ConfigError, DatasetSpec
from .instruction import Doc, Encoder, Skip

log = logging.getLogger("megamem.data")
TOKENIZE_BATCH = 64
_END = object()
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSION = (".gz", ".bz2", ".zst", ".xz")


class Source:
    """Base: deterministic documents for (epoch, pos); subclasses implement _items(epoch, pos)."""

    def __init__(self, label: str, train: bool):
        self.label, self.train = label, train
        self.epoch, self.pos, self.skipped = 0, 0, Counter()
        self._it: Optional[Iterator] = None
        self._docs_this_epoch = 0

    def state(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "skipped": dict(self.skipped)}

    def load_state(self, st: Dict[str, Any]) -> None:
        self.epoch, self.pos, self.skipped = int(st["epoch"]), int(st["pos"]), Counter(st["skipped"])
        self._it, self._docs_this_epoch = None, 1  # a restored position is inside a non-empty epoch

    def next_doc(self) -> Doc:
        while True:
            if self._it is None:
                self._it = self._items(self.epoch, self.pos)
            item = next(self._it, _END)
            if item is _END:
                if not self.train:
                    raise StopIteration
                if self._docs_this_epoch == 0:
                    raise ConfigError(f"{self.label}: no documents for this rank (empty data, all records skipped, "
                                      "or fewer records than data-parallel ranks)")
                self.epoch, self.pos, self._it, self._docs_this_epoch = self.epoch + 1, 0, None, 0
                continue
            self.pos += 1
            if isinstance(item, Skip):
                if item.reason is not None:
                    if not self.skipped[item.reason]:
                        log.warning("skipping records (%s), counted in loader.skipped; first: %s", item.reason,
                                    item.where)
                    self.skipped[item.reason] += 1
                continue
            self._docs_this_epoch += 1
            return item

    def _items(self, epoch: int, pos: int) -> Iterator[Union[Doc, Skip]]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- local files
def resolve_files(patterns: Union[str, List[str]], label: str) -> List[str]:
    """Globs → sorted existing, non-empty files; one message naming what is missing or empty."""
    files: List[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found = sorted(f for f in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(f))
        else:
            found = sorted(glob.glob(pattern, recursive=True))
        if not found:
            raise ConfigError(f"{label}: file not found: {pattern}")
        files += found
    for f in files:
        if os.path.getsize(f) == 0:
            raise ConfigError(f"{label}: file is empty: {f}")
    return files


def builder_for(files: List[str], label: str) -> str:
    kinds = set()
    for f in files:
        stem = f[:-len(next(c for c in COMPRESSION if f.endswith(c)))] if f.endswith(COMPRESSION) else f
        ext = os.path.splitext(stem)[1].lower()
        if ext not in BUILDERS:
            raise ConfigError(f"{label}: cannot read {f}: supported files are {', '.join(BUILDERS)} "
                              f"(optionally {', '.join(COMPRESSION)})")
        kinds.add(BUILDERS[ext])
    if len(kinds) > 1:
        raise ConfigError(f"{label}: files of different kinds ({', '.join(sorted(kinds))}) in one source; "
                          "make one data.datasets entry per kind")
    return kinds.pop()


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def first_bad_json_line(path: str) -> Optional[str]:
    """'line N: <why>' for the first line of a JSON-lines file that is not one JSON object, else None."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
                if not isinstance(record, dict):
                    return f"line {n}: a JSON {type(record).__name__}, expected an object ({{\"text\": ...}})"
    except UnicodeDecodeError:
        return None
    return None


def bad_json_record(label: str, paths: List[str]) -> Optional[ConfigError]:
    """The error naming the first malformed record (file and line) among JSON-lines files, if any."""
    for path in paths:
        bad = first_bad_json_line(path) if path.endswith((".jsonl", ".json")) else None
        if bad is not None:
            return ConfigError(f"{label}: {path} {bad}; fix or remove that record")
    return None


def read_error(e: BaseException, what: str) -> ConfigError:
    root = _root_cause(e)
    if isinstance(root, UnicodeDecodeError):
        return ConfigError(f"{what}: not valid UTF-8 ({root.reason} at byte {root.start}: {root.object[root.start:root.end]!r})")
    msg = str(root).splitlines()[0] if str(root) else type(root).__name__
    return ConfigError(f"{what}: could not be read: {type(root).__name__}: {msg}")


def _builder_kwargs(builder: str, spec: DatasetSpec) -> Dict[str, Any]:
    return {"sample_by": spec.sample_by} if builder == "text" else {}


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets logs a failed read at ERROR level before raising; megamem reports it as one line itself."""
    import datasets

    logger = datasets.utils.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_local(files: List[str], spec: DatasetSpec, label: str, cache_dir: Optional[str]):
    """Files → one Arrow Dataset (loaded per file, so errors and records name their file) + file starts."""
    import datasets

    builder = builder_for(files, label)
    parts = []
    for f in files:
        try:
            with quiet_datasets():
                parts.append(datasets.load_dataset(builder, data_files=[f], split="train", cache_dir=cache_dir,
                                                   **_builder_kwargs(builder, spec)))
        except Exception as e:  # noqa: BLE001
            raise bad_json_record(label, [f]) or read_error(e, f"{label}: {f}") from None
        if len(parts[-1]) == 0:
            raise ConfigError(f"{label}: no records in {f}")
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return ds, files, np.cumsum([0] + [len(p) for p in parts])


class MapSource(Source):
    """Random-access records (Arrow, memory-mapped): seeded permutation per epoch, rank r takes every r-th."""

    def __init__(self, ds, files: List[str], starts, encoder: Encoder, label: str, train: bool, seed: int,
                 shuffle: bool, rank: int, world: int):
        super().__init__(label, train)
        self.ds, self.files, self.starts = ds, files, starts
        self.encoder, self.seed, self.shuffle, self.rank, self.world = encoder, seed, shuffle, rank, world
        self._order_cache: Dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order_cache:
            n = len(self.ds)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle and self.train \
                else np.arange(n)
            self._order_cache = {epoch: order[self.rank::self.world]}
        return self._order_cache[epoch]

    def _where(self, idx: int) -> str:
        if not self.files:
            return f"{self.label} record {idx + 1}"
        f = int(np.searchsorted(self.starts, idx, side="right")) - 1
        return f"{self.files[f]} record {idx - int(self.starts[f]) + 1}"

    def _items(self, epoch, pos):
        order = self._order(epoch)
        for start in range(pos, len(order), TOKENIZE_BATCH):
            idx = [int(i) for i in order[start:start + TOKENIZE_BATCH]]
            cols = self.ds[idx]
            records = [{k: cols[k][j] for k in cols} for j in range(len(idx))]
            yield from self.encoder.encode(records, [self._where(i) for i in idx])


class StreamSource(Source):
    """`datasets` IterableDataset (hub or local): split by node, seeded shuffle buffer, set_epoch per epoch."""

    def __init__(self, ds, encoder: Encoder, label: str, train: bool, seed: int, shuffle: bool, buffer: int,
                 rank: int, world: int, files: Optional[List[str]] = None):
        super().__init__(label, train)
        self.files = files or []  # local files: a read error is traced to its file and line
        from datasets.distributed import split_dataset_by_node

        self.base = split_dataset_by_node(ds, rank=rank, world_size=world)
        self.encoder, self.seed, self.shuffle, self.buffer, self.rank = encoder, seed, shuffle, buffer, rank

    def _stream(self, epoch: int):
        ds = self.base
        if self.shuffle and self.train and self.buffer > 0:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(epoch)
        return ds

    def _items(self, epoch, pos):
        it = islice(iter(self._stream(epoch)), pos, None)
        k = pos
        while True:
            try:
                with quiet_datasets():  # a bad file is reported as one line below, not also by datasets' logger
                    records = list(islice(it, TOKENIZE_BATCH))
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - a file that fails mid-stream
                raise bad_json_record(self.label, self.files) or \
                    read_error(e, f"{self.label}: record {k + 1} of rank {self.rank}'s stream") from None
            if not records:
                return
            wheres = [f"{self.label} record {k + j + 1} (rank {self.rank}'s stream, epoch {epoch})"
                      for j in range(len(records))]
            k += len(records)
            yield from self.encoder.encode(records, wheres)


def open_stream(spec: DatasetSpec, files: Optional[List[str]], split: str, label: str):
    """An IterableDataset for a hub dataset (streaming) or local files (streaming: true)."""
    import datasets

    try:
        if files is not None:
            builder = builder_for(files, label)
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=True,
                                         **_builder_kwargs(builder, spec))
        return datasets.load_dataset(spec.name, spec.subset, split=split, streaming=True)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        if files is None:
            first = str(_root_cause(e)).splitlines()[0] if str(_root_cause(e)) else type(_root_cause(e)).__name__
            raise ConfigError(f"{label}: unknown dataset '{spec.name}' (split '{split}'): not a local path and "
                              f"not loadable from the Hugging Face hub: {first}") from None
        raise read_error(e, label) from None


def map_hub(spec: DatasetSpec, split: str, label: str, cache_dir: Optional[str]):
    import datasets

    try:
        return datasets.load_dataset(spec.name, spec.subset, split=split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001
        root = _root_cause(e)
        raise ConfigError(f"{label}: unknown dataset '{spec.name}' (split '{split}'): not a local path and not "
                          f"loadable from the Hugging Face hub: {str(root).splitlines()[0] if str(root) else type(root).__name__}") from None
