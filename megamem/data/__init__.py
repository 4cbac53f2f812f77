"""Data: tokenizers, sources (hub, local files, shards), mixtures, packing, instruction labels, resume."""
from .loader import DataLoader, build_loader, dataset_specs
from .tokenizer import CHAT_TEMPLATE, check_tokenizer, load_tokenizer, train_sentencepiece

__all__ = ["CHAT_TEMPLATE", "DataLoader", "build_loader", "check_tokenizer", "dataset_specs", "load_tokenizer",
           "train_sentencepiece"]
