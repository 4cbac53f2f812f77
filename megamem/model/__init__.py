"""The memory transformer, defined without parallelism."""
from ..config import MegamemConfig
from .transformer import CausalLMOutput, MemoryTransformer


def build_model(cfg: MegamemConfig):
    """The model of a validated config: from scratch, or (model.base_model_name) a pretrained HF model
    with memory/LoRA adapters (megamem.adapter); refuses what this version cannot build."""
    if cfg.model.base_model_name is not None:
        from ..adapter import build_adapter_model

        return build_adapter_model(cfg)
    return MemoryTransformer(cfg.model, cfg.memory)


__all__ = ["CausalLMOutput", "MemoryTransformer", "build_model"]
