"""Memory (and LoRA via peft) injected into pretrained Hugging Face causal LMs."""
from .build import build_adapter_model, build_any_model, lora_enabled
from .families import FAMILIES, Dims, register_family
from .model import AdapterModel
from .saving import export_adapter, is_adapter_export, load_adapter, save_adapter

__all__ = ["AdapterModel", "Dims", "FAMILIES", "build_adapter_model", "build_any_model", "export_adapter", "is_adapter_export",
           "load_adapter", "lora_enabled", "register_family", "save_adapter"]
