"""Memory (and LoRA via peft) injected into pretrained Hugging Face causal LMs."""
from .build import build_adapter_model, lora_enabled
from .families import FAMILIES, Dims, register_family
from .model import AdapterModel

__all__ = ["AdapterModel", "Dims", "FAMILIES", "build_adapter_model", "lora_enabled", "register_family"]
