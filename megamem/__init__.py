"""megamem: memory-augmented transformers, pretrained at scale with DeepSpeed."""
__version__ = "0.1.0"
