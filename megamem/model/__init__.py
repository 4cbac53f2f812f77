"""The memory transformer, defined without parallelism."""
from ..config import ConfigError, MegamemConfig
from .transformer import CausalLMOutput, MemoryTransformer


def build_model(cfg: MegamemConfig) -> MemoryTransformer:
    """From-scratch model for a validated config; refuses what this version cannot build."""
    if cfg.model.base_model_name is not None:
        raise ConfigError("model.base_model_name is set: memory adapters on pretrained Hugging Face models "
                          "are not available in this version; remove base_model_name to train from scratch")
    return MemoryTransformer(cfg.model, cfg.memory)


__all__ = ["CausalLMOutput", "MemoryTransformer", "build_model"]
