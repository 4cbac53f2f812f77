"""build_loader: config → sources → mixture → packer → batches, prefetched, with exact resume.

Each produced batch travels with the pipeline state *after* it, so `state_dict()` always
describes what has been yielded, never what the background worker has prefetched.
"""
from __future__ import annotations

import copy
import json
import os
import queue
import threading
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import yaml

from ..config import ConfigError, DatasetSpec, MegamemConfig
from ..config.load import _EntryError, coerce_entry
from .instruction import Encoder
from .mixture import Mixture
from .packing import IGNORE, PAD_DOC, Packer
from .shards import ShardSource
from .sources import MapSource, Source, StreamSource, load_local, map_hub, open_stream, resolve_files

STATE_FORMAT = "megamem-loader-1"


def _looks_local(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name)) or any(c in name for c in "*?[") or \
        name.startswith((".", "/", "~")) or os.path.splitext(name)[1].lower() in (".txt", ".jsonl", ".json",
                                                                                 ".parquet", ".csv", ".gz", ".zst")


def dataset_specs(cfg: MegamemConfig) -> List[DatasetSpec]:
    """The sources of a run: data.data_mix, else data.datasets, else training.dataset_name."""
    d, t = cfg.data, cfg.training
    if d.data_mix is not None:
        path = d.data_mixes_file
        if not path or not os.path.isfile(path):
            raise ConfigError(f"data.data_mixes_file not found: {path}")
        with open(path, encoding="utf-8") as f:
            mixes = (yaml.safe_load(f) or {}).get("data_mixes")
        if not isinstance(mixes, dict):
            raise ConfigError(f"{path}: expected a top-level 'data_mixes:' mapping of mix name → list of datasets")
        if d.data_mix not in mixes:
            raise ConfigError(f"{path}: no mix named '{d.data_mix}' (mixes: {', '.join(map(str, mixes))})")
        entries = mixes[d.data_mix]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{path}: mix '{d.data_mix}' must be a non-empty list of datasets")
        specs = []
        for i, e in enumerate(entries):
            try:
                specs.append(coerce_entry(e, DatasetSpec, f"mix '{d.data_mix}' entry {i}"))
            except _EntryError as err:
                raise ConfigError(f"{path}: {err}") from None
            if specs[-1].name is None and specs[-1].path is None or not specs[-1].weight > 0:
                raise ConfigError(f"{path}: mix '{d.data_mix}' entry {i} needs a name or path and a weight > 0")
        return specs
    if d.datasets:
        return list(d.datasets)
    if t.dataset_name:
        local = _looks_local(t.dataset_name)
        return [DatasetSpec(name=None if local else t.dataset_name, path=t.dataset_name if local else None,
                            subset=t.dataset_subset, split=t.dataset_split, eval_split=t.eval_split)]
    raise ConfigError("no training data: set training.dataset_name, data.datasets, data.data_mix or data.shards")


def _source(spec: DatasetSpec, cfg: MegamemConfig, tokenizer, train: bool, rank: int, world: int) -> Source:
    d, t = cfg.data, cfg.training
    label = f"dataset '{spec.name or spec.path}'"
    paths, hub_split, holdout = spec.path, spec.split, 0.0
    if not train:
        if spec.eval_path is not None:
            paths = spec.eval_path
        elif spec.eval_split is not None and spec.path is None:
            hub_split = spec.eval_split
        elif d.eval_fraction > 0:
            holdout = d.eval_fraction
        else:
            raise ConfigError(f"{label}: no evaluation data: set its eval_path (local files), eval_split (hub; "
                              "training.eval_split for training.dataset_name) or data.eval_fraction")
    elif spec.eval_path is None and spec.eval_split is None:
        holdout = d.eval_fraction  # train excludes what eval holds out
    encoder = Encoder(tokenizer, t.training_mode, t.max_length, spec.text_field or t.text_field,
                      spec.text_template or d.text_template, d.overlong, d.bad_records, holdout, not train)
    local = paths is not None
    streaming = spec.streaming if spec.streaming is not None else not local
    files = resolve_files(paths, label) if local else None
    if streaming:
        ds = open_stream(spec, files, hub_split, label)
        return StreamSource(ds, encoder, label, train, t.seed, d.shuffle, d.shuffle_buffer, rank, world, files)
    if local:
        ds, files, starts = load_local(files, spec, label, d.cache_dir)
    else:
        ds, files, starts = map_hub(spec, hub_split, label, d.cache_dir), [], None
    return MapSource(ds, files, starts, encoder, label, train, t.seed, d.shuffle, rank, world)


class DataLoader:
    """Iterator of batches. train: endless (new shuffle order each epoch); eval: one pass per iter()."""

    def __init__(self, cfg: MegamemConfig, tokenizer, split: str = "train", rank: int = 0, world_size: int = 1):
        if split not in ("train", "eval"):
            raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        t, d = cfg.training, cfg.data
        train = split == "train"
        self.batch_size, self.max_length = t.batch_size, t.max_length
        self.document_masking = d.document_masking
        pad = cfg.model.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                   else tokenizer.eos_token_id)
        if d.shards is not None:
            sub = t.dataset_split if train else (t.eval_split or "validation")
            path = d.shards if os.path.isfile(os.path.join(d.shards, "index.json")) and train \
                else os.path.join(d.shards, sub)
            if t.training_mode != "pretraining":
                raise ConfigError("data.shards holds pretraining tokens; instruction_finetuning reads chat records")
            from .tokenizer import tokenizer_fingerprint

            sources: List[Source] = [ShardSource(path, train, t.seed, d.shuffle, rank, world_size,
                                                 cfg.model.vocab_size, tokenizer.eos_token_id,
                                                 tokenizer_fingerprint(tokenizer))]
            weights = [1.0]
        else:
            specs = dataset_specs(cfg)
            sources = [_source(s, cfg, tokenizer, train, rank, world_size) for s in specs]
            weights = [s.weight for s in specs]
        self.source_labels = [s.label for s in sources]
        self.mixture = Mixture(sources, weights, t.seed, rank, train)
        instruction = t.training_mode == "instruction_finetuning"
        self.packer = Packer(self.mixture, t.max_length, self.pad_id, split_docs=not instruction,
                             pack=not instruction or d.pack_instructions)
        self._initial = self._pipeline_state()
        self._state = copy.deepcopy(self._initial)
        self.num_workers, self.prefetch = d.num_workers, d.prefetch_batches
        self._thread: Optional[threading.Thread] = None
        self._q: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._gen: Optional[Iterator] = None
        self._ended = False

    # ------------------------------------------------------------------ production
    def _pipeline_state(self) -> Dict[str, Any]:
        return {"packer": self.packer.state()}

    def _make_batch(self) -> Optional[Dict[str, torch.Tensor]]:
        rows = []
        while len(rows) < self.batch_size:
            row = self.packer.next_row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            return None
        L = self.max_length
        while len(rows) < self.batch_size:  # the last eval batch: full shape, padding rows carry no loss
            rows.append(([self.pad_id] * L, [IGNORE] * L, [PAD_DOC] * L))
        arr = np.asarray(rows, dtype=np.int64)  # [B, 3, L]
        batch = {"input_ids": torch.from_numpy(arr[:, 0].copy()), "labels": torch.from_numpy(arr[:, 1].copy())}
        if self.document_masking:
            batch["document_ids"] = torch.from_numpy(arr[:, 2].astype(np.int32))
        return batch

    def _produce(self) -> Iterator:
        while True:
            batch = self._make_batch()
            if batch is None:
                return
            yield batch, self._pipeline_state()

    def _worker(self) -> None:
        try:
            for item in self._produce():
                while not self._stop.is_set():
                    try:
                        self._q.put(("batch", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._q.put(("error", e))

    def _start(self) -> None:
        if self.num_workers == 0:
            self._gen = self._produce()
            return
        self._stop.clear()
        self._q = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._worker, name=f"megamem-data-{self.split}-{self.rank}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background worker (state is kept)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            # the worker ran ahead of what was yielded: rewind to the yielded state
            self.packer.load_state(copy.deepcopy(self._state["packer"]))
        self._thread, self._q, self._gen = None, None, None

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        if self.split == "eval" and (self._ended or self._state != self._initial):
            self._restore(copy.deepcopy(self._initial))  # each iter() over eval is one full pass
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._ended:
            raise StopIteration
        if self._gen is None and self._thread is None:
            self._start()
        if self._gen is not None:
            item = next(self._gen, None)
            if item is None:
                self._ended = True
                raise StopIteration
        else:
            kind, item = self._q.get()
            if kind == "end":
                self._ended = True
                self.close()
                raise StopIteration
            if kind == "error":
                self.close()
                raise item
        batch, self._state = item
        return batch

    # ------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        return min(s["epoch"] for s in self._state["packer"]["stream"]["sources"])

    @property
    def skipped(self) -> Dict[str, int]:
        """Records skipped so far (by reason) among those behind the yielded batches."""
        out: Dict[str, int] = {}
        for s in self._state["packer"]["stream"]["sources"]:
            for k, v in s["skipped"].items():
                out[k] = out.get(k, 0) + v
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"format": STATE_FORMAT, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "seed": self.cfg.training.seed, "sources": list(self.source_labels),
                "pipeline": json.loads(json.dumps(self._state))}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a megamem data loader state (format {state.get('format')!r})")
        if state["world_size"] != self.world_size:
            raise ConfigError(f"data loader state was saved with world_size {state['world_size']} but this run has "
                              f"world_size {self.world_size}: resuming data with a different number of data-parallel "
                              "ranks is not supported; resume with the same number of ranks")
        for key, ours in (("rank", self.rank), ("split", self.split), ("seed", self.cfg.training.seed),
                          ("sources", self.source_labels)):
            if state[key] != ours:
                raise ConfigError(f"data loader state has {key} {state[key]!r} but this loader has {ours!r}: "
                                  "the state belongs to another rank or data configuration")
        self._restore(copy.deepcopy(state["pipeline"]))

    def _restore(self, pipeline: Dict[str, Any]) -> None:
        self.close()
        self.packer.load_state(pipeline["packer"])
        self._state, self._ended = pipeline, False


def build_loader(cfg: MegamemConfig, tokenizer, split: str = "train", rank: int = 0, world_size: int = 1) -> DataLoader:
    return DataLoader(cfg, tokenizer, split, rank, world_size)
