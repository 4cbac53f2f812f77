"""MegamemForCausalLM: megamem's MemoryTransformer behind the transformers PreTrainedModel API.

The wrapped model is `self.model` (state-dict keys are megamem's with a `model.` prefix), so the
same weights serve megamem and transformers. generate() runs on megamem's own KV cache, which
megamem creates for each generate() call and clears after it (HF's cache machinery is not used, so
nothing depends on how a transformers release names its cache); chapter routing at inference
(sequence / rolling / token) behaves exactly as in `MemoryTransformer.generate`; greedy tokens are
the same. Only public GenerationMixin hooks are overridden (generate, prepare_inputs_for_generation).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from .configuration import MegamemHFConfig


@dataclass
class MegamemCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    aux_losses: Optional[Dict[str, torch.Tensor]] = None  # router losses (chapter models, no cache)
    chapter_usage: Optional[Dict[int, torch.Tensor]] = None  # per memory layer: units that read each chapter


def check_attention_mask(mask: Optional[torch.Tensor], cached: bool) -> None:
    """megamem has no padding mask: right padding is harmless to the real tokens of a causal model
    (dense memory); left padding, or any padding while generating, would change the result."""
    if mask is None or bool(mask.all()):
        return
    if cached:
        raise ValueError("megamem generate() takes unpadded prompts (attention_mask has zeros); generate each prompt "
                         "on its own or give prompts of equal length")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("megamem models accept right padding only (attention_mask has zeros before ones)")


class MegamemForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegamemHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.tok_embeddings.weight"}  # when tie_word_embeddings

    def __init__(self, config: MegamemHFConfig, model=None):
        super().__init__(config)
        from ..model import MemoryTransformer

        cfg = config.megamem_config()
        self.model = model if model is not None else MemoryTransformer(cfg.model, cfg.memory)
        if config.routing_strategy_inference is not None:  # a wrapped model keeps its own config object
            self.model.memory_config.routing_strategy_inference = config.routing_strategy_inference
        self.post_init()

    @classmethod
    def from_megamem(cls, model, cfg, **config_kwargs) -> "MegamemForCausalLM":
        """Wrap an existing MemoryTransformer (weights shared, nothing copied)."""
        return cls(MegamemHFConfig.from_megamem(cfg, **config_kwargs), model=model).to(model.tok_embeddings.weight.dtype)

    # ----------------------------------------------------------- HF plumbing
    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def set_routing_strategy(self, strategy: str) -> None:
        """Chapter routing used by generate(): sequence | rolling | token."""
        from .configuration import ROUTING_STRATEGIES

        if strategy not in ROUTING_STRATEGIES:
            raise ValueError(f"routing strategy {strategy!r}; valid: {', '.join(ROUTING_STRATEGIES)}")
        self.config.routing_strategy_inference = strategy
        self.model.memory_config.routing_strategy_inference = strategy

    def _init_weights(self, module):
        """Only what a checkpoint does not hold: the position encoding's non-persistent buffers (e.g.
        RoPE's frequencies), recomputed by the encoding itself.

        Weights keep megamem's own initialisation (MemoryTransformer's constructor: zero W_o, bank
        init) or come from the checkpoint; transformers' generic init would overwrite both.
        """
        from ..model.positions import PositionEncoding

        if isinstance(module, PositionEncoding):
            module.reset_buffers()

    @property
    def gradient_checkpointing(self) -> bool:
        from ..parallel.checkpointing import activation_checkpointing

        return activation_checkpointing(self.model)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """transformers' gradient_checkpointing_enable() sets this: megamem checkpoints every block."""
        from ..parallel.checkpointing import set_activation_checkpointing

        set_activation_checkpointing(self.model, enabled)

    # --------------------------------------------------------------- forward
    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, megamem_cache=None, **kwargs) -> MegamemCausalLMOutput:
        """labels: as in transformers (same shape as input_ids, shifted inside, -100 ignored).
        megamem_cache: megamem's DecodingCache, passed by generate(); other keywords (HF's own) are ignored."""
        check_attention_mask(attention_mask, megamem_cache is not None)
        out = self.model(input_ids, labels=labels, cache=megamem_cache)
        return MegamemCausalLMOutput(loss=out.loss, logits=out.logits, aux_losses=out.aux_losses,
                                     chapter_usage=out.chapter_usage)

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, inputs: Optional[torch.Tensor] = None, generation_config=None, **kwargs):
        """transformers' generate() on megamem's own KV cache (greedy or sampled; no beam search).

        The cache is created by the prompt's forward and dropped when generate() returns; HF is told
        to keep no cache of its own (use_cache=False), so its cache handling never runs."""
        from transformers.cache_utils import Cache

        beams = kwargs.get("num_beams", getattr(generation_config or self.generation_config, "num_beams", 1))
        if beams is not None and beams > 1:
            raise ValueError("megamem models generate with greedy or sampled decoding (num_beams=1); beam search "
                             "would need its KV cache reordered, which it does not support")
        if any(isinstance(v, Cache) for v in kwargs.values()):
            raise ValueError("megamem models keep their own KV cache while generating; pass no transformers Cache "
                             "object to generate()")
        kwargs["use_cache"] = False
        with self._decoding():
            return super().generate(inputs, generation_config, **kwargs)

    @contextlib.contextmanager
    def _decoding(self):
        if getattr(self, "_megamem_decoding", None) is not None:
            raise RuntimeError("megamem models run one generate() at a time")
        self._megamem_decoding = {}  # the DecodingCache, created by the prompt's forward
        try:
            yield
        finally:
            self._megamem_decoding = None

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The tokens megamem's cache has not seen yet, and that cache (created here for the prompt)."""
        state = getattr(self, "_megamem_decoding", None)
        if state is None:
            raise RuntimeError("prepare_inputs_for_generation of a megamem model runs inside its generate() only")
        if "cache" not in state:
            state["cache"] = self.model.new_cache(input_ids.shape[0], self.model.model_config.max_seq_len,
                                                  capacity=input_ids.shape[1] + 64)
        cache = state["cache"]
        if input_ids.shape[1] <= cache.length:
            raise RuntimeError(f"generate() fed {input_ids.shape[1]} tokens to a cache already holding {cache.length}")
        return {"input_ids": input_ids[:, cache.length:].to(self.device), "megamem_cache": cache,
                "attention_mask": attention_mask}
