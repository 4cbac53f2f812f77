"""MegamemHFConfig: a transformers config that carries megamem's own model/memory config.

The megamem model/memory sections are stored verbatim under `megamem` (one source of truth;
nothing is translated twice), with the run's training_mode (pretraining runs get no chat template). A few standard fields (vocab_size, hidden_size, ...) are mirrored for tools that
read them (generate(), lm-eval's max length). `routing_strategy_inference` overrides the chapter
routing used by generate() (sequence | rolling | token), e.g. `from_pretrained(dir, routing_strategy_inference="token")`.
`megamem_format_version` (megamem.folders.FORMAT_VERSION) makes a folder of a newer megamem fail to
load with a line saying to upgrade, however it is loaded (transformers' auto classes included).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import PretrainedConfig

MODEL_TYPE = "megamem"
ROUTING_STRATEGIES = ("sequence", "rolling", "token")


class MegamemHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, megamem: Optional[Dict[str, Any]] = None, routing_strategy_inference: Optional[str] = None,
                 megamem_format_version: Optional[int] = None, **kwargs):
        self.megamem = megamem or {}
        self.routing_strategy_inference = routing_strategy_inference
        self.megamem_format_version = megamem_format_version  # None: written before versions were recorded
        m = self.megamem.get("model", {})
        for hf_name, ours in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_dim"),
                              ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
                              ("max_position_embeddings", "max_seq_len"), ("initializer_range", "initializer_range")):
            if ours in m:
                kwargs.setdefault(hf_name, m[ours])
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(name, m.get(name))
        kwargs.setdefault("tie_word_embeddings", bool(m.get("tie_embeddings", False)))
        super().__init__(**kwargs)

    def megamem_config(self):
        """The validated megamem config (model + memory sections), with the inference routing override."""
        from ..config import ConfigError, config_from_dict, validate
        from ..folders import check_format_version

        if self.megamem_format_version is not None:  # a newer megamem's folder: refused before anything is read
            check_format_version(self.megamem_format_version, "config.json")
        if self.routing_strategy_inference is not None and self.routing_strategy_inference not in ROUTING_STRATEGIES:
            raise ConfigError(f"routing_strategy_inference = {self.routing_strategy_inference!r}; valid: "
                              f"{', '.join(ROUTING_STRATEGIES)}")
        data = {k: v for k, v in self.megamem.items() if k in ("model", "memory")}
        data["training"] = {"max_length": data.get("model", {}).get("max_seq_len", 1024),  # not a training run
                            "training_mode": self.megamem.get("training_mode", "pretraining")}
        cfg = config_from_dict(data, "config.json: megamem")
        if self.routing_strategy_inference is not None:
            cfg.memory.routing_strategy_inference = self.routing_strategy_inference
        problems = validate(cfg)
        if problems:
            raise ConfigError("config.json: megamem: " + "; ".join(problems))
        return cfg

    @classmethod
    def from_megamem(cls, cfg, **kwargs) -> "MegamemHFConfig":
        from ..config import config_to_dict
        from ..folders import FORMAT_VERSION

        data = config_to_dict(cfg)
        return cls(megamem={"model": data["model"], "memory": data["memory"],
                            "training_mode": cfg.training.training_mode}, megamem_format_version=FORMAT_VERSION,
                   **kwargs)
