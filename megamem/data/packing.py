"""Documents → rows of exactly max_length tokens.

pretraining: documents (each ending in eos) are concatenated and cut into rows; a document may
continue in the next row, no token is dropped or repeated. instruction: whole examples are packed
greedily (or one per row) and the rest of the row is padding with label -100.
State = the stream's state before the current document + how far into it we are, so a resumed
packer rebuilds the same partial document instead of storing its tokens.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .instruction import Doc
from .mixture import Mixture

IGNORE = -100
PAD_DOC = -1  # document id of padding


class Packer:
    def __init__(self, stream: Mixture, max_length: int, pad_id: int, split_docs: bool, pack: bool):
        self.stream, self.L, self.pad_id = stream, max_length, pad_id
        self.split_docs, self.pack = split_docs, pack  # split_docs: pretraining; pack: several docs per row
        self.doc: Optional[Doc] = None
        self.doc_state: Optional[Dict[str, Any]] = None
        self.offset = 0
        self.done = False

    def _pull(self) -> bool:
        if self.doc is None and not self.done:
            self.doc_state = self.stream.state()
            try:
                self.doc, self.offset = self.stream.next_doc(), 0
            except StopIteration:
                self.doc, self.done = None, True
        return self.doc is not None

    def next_row(self) -> Optional[Tuple[List[int], List[int], List[int]]]:
        """(input_ids, labels, document_ids) of one row, or None when a finite stream is exhausted."""
        ids: List[int] = []
        labels: List[int] = []
        docs: List[int] = []
        d = 0
        while len(ids) < self.L and self._pull():
            doc = self.doc
            n = len(doc.ids) - self.offset
            room = self.L - len(ids)
            if n > room and not self.split_docs:
                if ids:
                    break  # the example starts the next row
                raise AssertionError("instruction examples are truncated to max_length before packing")
            take = min(n, room)
            part = [int(t) for t in doc.ids[self.offset:self.offset + take]]
            ids += part
            if doc.trained is None:
                labels += part
            else:
                labels += [t if m else IGNORE for t, m in zip(part, doc.trained[self.offset:self.offset + take])]
            docs += [d] * take
            self.offset += take
            if self.offset == len(doc.ids):
                self.doc, d = None, d + 1
            if not self.pack:
                break
        if not ids:
            return None
        pad = self.L - len(ids)
        return ids + [self.pad_id] * pad, labels + [IGNORE] * pad, docs + [PAD_DOC] * pad

    def state(self) -> Dict[str, Any]:
        if self.doc is not None:
            return {"stream": self.doc_state, "offset": self.offset, "in_doc": True, "done": self.done}
        return {"stream": self.stream.state(), "offset": 0, "in_doc": False, "done": self.done}

    def load_state(self, st: Dict[str, Any]) -> None:
        self.stream.load_state(st["stream"])
        self.done, self.doc = bool(st["done"]), None
        if st["in_doc"]:
            self._pull()
            self.offset = int(st["offset"])
