"""megamem: memory-augmented transformers, pretrained at scale with DeepSpeed."""
__version__ = "0.1.0"

from .hf.register import install as _register_with_transformers  # noqa: E402

_register_with_transformers()  # AutoConfig / AutoModelForCausalLM learn model_type "megamem" (lazily)
