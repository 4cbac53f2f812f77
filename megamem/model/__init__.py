"""The memory transformer, defined without parallelism."""
from ..config import ConfigError, MegamemConfig
from .transformer import CausalLMOutput, MemoryTransformer


def build_model(cfg: MegamemConfig) -> MemoryTransformer:
    """From-scratch model for a validated config; refuses what this version cannot build."""
    if cfg.model.base_model_name is not None:
        raise ConfigError("model.base_model_name is set: memory adapters on pretrained Hugging Face models "
                          "are not available in this version; remove base_model_name to train from scratch")
    if cfg.memory.use_chapters and not cfg.memory.vanilla_mode:
        raise ConfigError("memory.use_chapters: chapter routing is not available in this version; "
                          "set use_chapters: false (the dense bank is read whole)")
    return MemoryTransformer(cfg.model, cfg.memory)


__all__ = ["CausalLMOutput", "MemoryTransformer", "build_model"]
