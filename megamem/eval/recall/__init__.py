"""Fact recall: a seeded synthetic knowledge corpus and the recall of its facts (tools/bench_recall.py)."""
from .corpus import KnowledgeBase, documents
from .score import encode_prompts, recall, recall_table, word_tokenizer

__all__ = ["KnowledgeBase", "documents", "encode_prompts", "recall", "recall_table", "word_tokenizer"]
