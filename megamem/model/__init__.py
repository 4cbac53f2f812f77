"""The memory transformer, defined without parallelism."""
from ..config import ConfigError, MegamemConfig
from .transformer import CausalLMOutput, MemoryTransformer


def build_model(cfg: MegamemConfig) -> MemoryTransformer:
    """The from-scratch model of a validated config. Adapter configs (model.base_model_name) are built
    one layer up, by megamem.adapter.build_any_model: the model layer never imports the adapters."""
    if cfg.model.base_model_name is not None:
        raise ConfigError(f"model.base_model_name is '{cfg.model.base_model_name}': an adapter model, built by "
                          "megamem.adapter.build_any_model (or build_adapter_model), not megamem.model.build_model")
    return MemoryTransformer(cfg.model, cfg.memory)


__all__ = ["CausalLMOutput", "MemoryTransformer", "build_model"]
