"""The memory transformer, defined without parallelism."""
from ..config import ConfigError, MegamemConfig
from .transformer import CausalLMOutput, MemoryTransformer


def build_model(cfg: MegamemConfig):
    """The model of a validated config: from scratch, or (model.base_model_name) a pretrained HF model
    with memory/LoRA adapters (megamem.adapter); refuses what this version cannot build."""
    if cfg.model.base_model_name is not None:
        from ..adapter import build_adapter_model

        return build_adapter_model(cfg)
    if cfg.memory.use_chapters and not cfg.memory.vanilla_mode:
        raise ConfigError("memory.use_chapters: chapter routing is not available in this version; "
                          "set use_chapters: false (the dense bank is read whole)")
    return MemoryTransformer(cfg.model, cfg.memory)


__all__ = ["CausalLMOutput", "MemoryTransformer", "build_model"]
