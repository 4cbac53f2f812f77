"""Records → token documents: text fields, templates, chat rendering and assistant-only labels.

A chat's trained span for assistant turn i is the text the template adds between
render(turns[:i], add_generation_prompt) and render(turns[:i+1]); tokens are marked by their
character offsets, so any prefix-stable chat template works without special tags.
"""
from __future__ import annotations

import string
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

from ..config import ConfigError

TextField = Union[str, List[str]]


@dataclass
class Doc:
    """A tokenized document: ids, and which of them carry loss (None = all)."""

    ids: Sequence[int]
    trained: Optional[List[bool]] = None


@dataclass
class Skip:
    """A record that yields no document; reason None = held out for the other split (not counted)."""

    reason: Optional[str]
    where: str = ""


def is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


class BadRecord(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def record_content(record: Dict[str, Any], text_field: TextField, template: Optional[str], where: str):
    """The text (str) or chat (list of messages) of one record."""
    if template is not None:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        missing = [f for f in fields if record.get(f) is None]
        if missing:
            raise BadRecord("missing_field", f"{where} has no field {missing[0]!r} used by text_template "
                                             f"(fields: {', '.join(map(str, record))})")
        return template.format_map(record)
    names = [text_field] if isinstance(text_field, str) else list(text_field)
    values = []
    for name in names:
        value = record.get(name)
        if value is None:
            raise BadRecord("missing_field", f"{where} has no field {name!r} (text_field; fields: "
                                             f"{', '.join(map(str, record))})")
        values.append(value)
    if len(values) == 1 and is_chat(values[0]):
        return values[0]
    bad = [n for n, v in zip(names, values) if not isinstance(v, str)]
    if bad:
        raise BadRecord("not_text", f"{where}: field {bad[0]!r} is {type(values[names.index(bad[0])]).__name__}, "
                                    "expected a string or a chat (a list of {role, content})")
    return "\n\n".join(values)  # several fields: joined by a blank line


def held_out(content, fraction: float) -> bool:
    """Deterministic eval hold-out by content hash: stable under shuffling, sharding and restarts."""
    if fraction <= 0:
        return False
    return zlib.crc32(repr(content).encode("utf-8")) % 1_000_000 < fraction * 1_000_000


class Encoder:
    """Turns records into Docs for one source (pretraining: text + eos; instruction: chat with masks)."""

    def __init__(self, tokenizer, mode: str, max_length: int, text_field: TextField, template: Optional[str],
                 overlong: str = "truncate", bad_records: str = "error", eval_fraction: float = 0.0,
                 eval_side: bool = False):
        self.tok, self.mode, self.max_length = tokenizer, mode, max_length
        self.text_field, self.template = text_field, template
        self.overlong, self.bad_records = overlong, bad_records
        self.eval_fraction, self.eval_side = eval_fraction, eval_side
        self.eos = tokenizer.eos_token_id

    def encode(self, records: List[Dict[str, Any]], wheres: List[str]) -> List[Union[Doc, Skip]]:
        out: List[Union[Doc, Skip, None]] = [None] * len(records)
        texts, text_pos = [], []
        for i, (rec, where) in enumerate(zip(records, wheres)):
            try:
                content = record_content(rec, self.text_field, self.template, where)
                if self.eval_fraction > 0 and held_out(content, self.eval_fraction) != self.eval_side:
                    out[i] = Skip(None, where)
                elif isinstance(content, list):
                    out[i] = self._chat(content, where)
                elif self.mode == "instruction_finetuning":
                    raise BadRecord("not_chat", f"{where}: instruction_finetuning needs a chat record (a list of "
                                                f"{{role, content}} in text_field {self.text_field!r}), got text")
                elif not content.strip():
                    out[i] = Skip("empty", where)
                else:
                    texts.append(content)
                    text_pos.append(i)
            except BadRecord as e:
                if self.bad_records == "error":
                    raise ConfigError(f"{e} (set data.bad_records: skip to skip and count such records)") from None
                out[i] = Skip(e.reason, f"{e}")
        if texts:
            for i, ids in zip(text_pos, self.tok(texts, add_special_tokens=False)["input_ids"]):
                out[i] = Doc(list(ids) + [self.eos])
        return out  # type: ignore[return-value]

    def _chat(self, messages: List[Dict[str, Any]], where: str) -> Union[Doc, Skip]:
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not turns:
            raise BadRecord("no_assistant", f"{where}: chat has no assistant turn (roles: "
                                            f"{', '.join(str(m.get('role')) for m in messages)})")
        render = self.tok.apply_chat_template
        text = render(messages, tokenize=False)
        spans = []
        for i in turns:
            before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = render(messages[:i + 1], tokenize=False)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ConfigError(f"{where}: the tokenizer's chat template is not prefix-stable, so assistant "
                                  "spans cannot be located; use a template that renders turns in order")
            spans.append((len(before), len(upto)))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        trained = [any(a <= s and e <= b for a, b in spans) and e > s for s, e in offsets]
        if self.mode != "instruction_finetuning":
            return Doc(ids + [self.eos])  # pretraining on chats: every token carries loss
        if len(ids) > self.max_length:
            if self.overlong == "skip":
                return Skip("overlong", where)
            ids, trained = ids[:self.max_length], trained[:self.max_length]
            if not any(trained):
                return Skip("overlong", where)  # truncation left no assistant token
        return Doc(ids, trained)
