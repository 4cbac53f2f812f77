"""Hugging Face interoperability: export megamem weights to transformers model folders."""
