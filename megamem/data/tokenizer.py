"""Tokenizers: load any HF tokenizer (checked against the model config) or train a SentencePiece one.

The model config owns vocab_size and the bos/eos/pad ids; a tokenizer that disagrees would train
embeddings for the wrong ids, so it is refused before any compute.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Optional

from ..config import ConfigError, MegamemConfig

# ChatML-style turns; {% generation %} marks assistant text for return_assistant_tokens_mask users.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SYMBOLS = ["<|im_start|>", "<|im_end|>"]


def load_tokenizer(cfg: MegamemConfig):
    """The HF tokenizer of cfg.model.tokenizer_name (a local folder, or a hub name when a hub is reachable)."""
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer_name
    if not name:
        raise ConfigError("model.tokenizer_name is not set: give a tokenizer folder "
                          "(e.g. one made by tools/train_tokenizer.py) or a hub name")
    local = os.path.isdir(name)
    # a hub id is 'name' or 'namespace/name': anything with more slashes, or path-like, is a local folder
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)):
        where = "" if os.path.isabs(name) else f" (relative to {os.getcwd()})"
        raise ConfigError(f"model.tokenizer_name: tokenizer folder not found: {name}{where}; make one with "
                          "tools/train_tokenizer.py (bash tools/demo.sh prepares data/tokenizers/kjv-4096)")
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local or bool(os.environ.get("HF_HUB_OFFLINE")))
    except Exception as e:  # noqa: BLE001 - any loader failure is a user error here
        where = "local folder" if local else "hub name (no local folder of that name; is the hub reachable?)"
        raise ConfigError(f"model.tokenizer_name '{name}': could not load a tokenizer from this {where}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_tokenizer(tok, cfg)
    return tok


def check_tokenizer(tok, cfg: MegamemConfig) -> None:
    m = cfg.model
    if len(tok) > m.vocab_size:
        raise ConfigError(f"tokenizer '{m.tokenizer_name}' has {len(tok)} tokens but model.vocab_size is "
                          f"{m.vocab_size}: set model.vocab_size >= {len(tok)}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ours, theirs = getattr(m, key), getattr(tok, key, None)
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(f"tokenizer '{m.tokenizer_name}' has {key} = {theirs} but model.{key} is {ours}: "
                              f"set model.{key}: {theirs}")
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer '{m.tokenizer_name}' has no eos token; documents are separated by eos")


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's vocabulary (token → id): equal for the same tokenizer wherever it lives."""
    import hashlib
    import json

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int = 4096, model_type: str = "bpe",
                        pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, unk_id: int = 3,
                        num_threads: Optional[int] = None, max_sentences: int = 2_000_000):
    """Train SentencePiece on `texts` (one document each) and save a folder AutoTokenizer loads.

    byte_fallback + identity normalisation make decode(encode(text)) == text for any UTF-8 text;
    the chat markers are single pieces inside vocab_size.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    ids = {"pad": pad_id, "bos": bos_id, "eos": eos_id, "unk": unk_id}
    if sorted(ids.values()) != list(range(4)):
        raise ConfigError(f"special ids must be 0..3 in some order, got {ids}")
    os.makedirs(out_dir, exist_ok=True)

    def sentences():
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
            pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_piece="<pad>", bos_piece="<s>",
            eos_piece="</s>", unk_piece="<unk>", byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=CHAT_SYMBOLS,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, max_sentence_length=1 << 16,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        os.replace(prefix + ".model", os.path.join(model_dir, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(model_dir, legacy=False, add_bos_token=False, add_eos_token=False)
    tok.pad_token = "<pad>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok
