"""Inference and evaluation glue: load any megamem output, perplexity, chapter usage, lm-eval."""
from .loading import Loaded, load_any
from .perplexity import perplexity

__all__ = ["Loaded", "load_any", "perplexity"]
