"""AdapterModel: a pretrained HF causal LM whose selected decoder layers read memory banks.

The base keeps its own modules and parameter names: a forward hook on each selected decoder
layer adds the memory branch to that layer's output (x → x + memory(x), layout B adds its extra
MLP), and a pre-hook on the base materialises each bank once per forward. Hooks instead of
wrapper modules, so the base's state dict, LoRA names and ZeRO-3 weight loading are unchanged,
and HF `generate()` (which calls the base directly) reads memory too. With wo_init_zero every
branch starts as the identity, so the adapted model starts exactly as the base model. The attractor
(model.attractor, attractor.py) runs in the same layer hook, after the memory branch, always zero-init;
pos_encoding.type pi_spiral adds a gated spiral to the input embeddings (spiral.py, gate 0 at init);
hybrid gates the from-scratch hybrid into the base's rotary module and first layer (hybrid.py, gate 0 at init).
While generating, the memory and attractor state live in megamem's DecodingState (see decoding.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from ..config import MegamemConfig, ModelConfig
from ..config.aliases import position_type
from ..memory.bank import build_bank
from ..memory.chapters import routing_stats
from ..memory.placement import bank_assignment, memory_layers, num_banks
from ..memory.router import ChapterRouter
from ..model.branches import MemoryBranch
from ..model.branches.attractor import AttractorBranch
from ..model.context import ForwardContext
from ..model.loss import causal_lm_loss
from ..model.flops import full_numel
from ..model.transformer import CausalLMOutput
from .attractor import attractor_model_config, build_attractors, check_attention_mask
from .decoding import DecodingState, DecodingStateError, find_hf_cache, refuse_stateless_decoding
from .families import Dims, family_of
from .hybrid import HybridGate, embedding_pre_hook, rotary_hook
from .lora import is_lora_name
from .spiral import SpiralGate, embedding_hook


def branch_model_config(dims: Dims) -> ModelConfig:
    """The megamem ModelConfig a MemoryBranch reads (widths of the base, RMSNorm, SwiGLU)."""
    return ModelConfig(hidden_dim=dims.hidden_size, num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads,
                       num_layers=dims.num_layers, intermediate_dim=dims.intermediate_size, norm_eps=dims.norm_eps,
                       use_rms_norm=True, hidden_activation="silu", initializer_range=dims.initializer_range,
                       dropout=0.0)


def hybrid_gate(cfg: MegamemConfig, width: int) -> Optional[HybridGate]:
    """pos_encoding.type hybrid's gate, with the from-scratch defaults K = 8000, W = 1000 (None for other types)."""
    p = cfg.model.pos_encoding
    if position_type(cfg.model) != "hybrid":
        return None
    return HybridGate(width, p.irrational or "pi", p.hybrid_K if p.hybrid_K is not None else 8000,
                      p.transition_width if p.transition_width is not None else 1000)


class AdapterModel(nn.Module):
    def __init__(self, base: nn.Module, cfg: MegamemConfig):
        super().__init__()
        self.base = base
        self.memory_config, self.adapter_config = cfg.memory, cfg
        self.dims = family_of(base.config).dims(base.config)
        self.model_config = branch_model_config(self.dims)
        self.memory_layers: List[int] = memory_layers(cfg.memory, self.dims.num_layers)
        self.bank_of_layer: Dict[int, int] = bank_assignment(cfg.memory, self.memory_layers)
        self.banks = nn.ModuleList(build_bank(cfg.memory, self.dims.hidden_size)
                                   for _ in range(num_banks(self.bank_of_layer)))
        self.branches = nn.ModuleDict({str(i): MemoryBranch(self.model_config, cfg.memory, i)
                                       for i in self.memory_layers})
        if cfg.memory.use_chapters and cfg.memory.shared_router and self.memory_layers:
            router = self.branches[str(self.memory_layers[0])].attn.router
            for i in self.memory_layers[1:]:
                self.branches[str(i)].attn.router = router
        self.attractors = build_attractors(attractor_model_config(self.model_config, cfg), cfg)
        self.spiral = SpiralGate(self.dims.hidden_size, cfg.model.pos_encoding.irrational or "pi") \
            if position_type(cfg.model) == "pi_spiral" else None
        self.hybrid = hybrid_gate(cfg, self.dims.hidden_size)
        dtype = base.get_input_embeddings().weight.dtype
        self.banks.to(dtype)
        self.branches.to(dtype)
        self.attractors.to(dtype)
        for gate in (self.spiral, self.hybrid):
            if gate is not None:
                gate.to(dtype)
        self._ctx = ForwardContext()  # the base forward's context for the memory hooks (banks, decoding state)
        self._decoding: Optional[DecodingState] = None  # open while generating (decoding())
        hooked = sorted(set(self.memory_layers) | {int(i) for i in self.attractors})
        layers = family_of(base.config).layers(base)
        for i in hooked:
            layers[i].register_forward_hook(self._layer_hook(i))
        if self.spiral is not None:
            base.get_input_embeddings().register_forward_hook(embedding_hook(self.spiral, lambda: self._ctx.past))
        if self.hybrid is not None:  # n = the position_ids of the base's decoder (continuing after its cache)
            family_of(base.config).rotary(base).register_forward_hook(rotary_hook(self.hybrid), with_kwargs=True)
            layers[0].register_forward_pre_hook(embedding_pre_hook(self.hybrid), with_kwargs=True)
        if hooked or self.spiral is not None:
            base.register_forward_pre_hook(self._before_base, with_kwargs=True)

    # ------------------------------------------------------------------ hooks
    def _before_base(self, module, args, kwargs):
        """Materialise banks once per forward; inside decoding(), once per generation (memory K/V too)."""
        hf_cache = find_hf_cache(args, kwargs.values())
        state = self._decoding
        if state is None and hf_cache is not None and hf_cache.get_seq_length() > 0:
            refuse_stateless_decoding(hf_cache.get_seq_length())
        if state is not None and hf_cache is None:
            raise DecodingStateError("memory adapter: decoding() needs generation with the HF KV cache; "
                                     "use_cache=False is not supported inside it")
        if len(self.attractors):
            check_attention_mask(kwargs.get("attention_mask"))
        if self.memory_config.use_chapters:
            self._routing_stats()  # drop stats of forwards nobody collected (e.g. a generate() without cache)
        if state is not None:
            state.step(hf_cache)
            banks = state.bank_tensors(self.banks)
        else:
            banks = [bank() for bank in self.banks]
        self._ctx = ForwardContext(cache=state, banks=dict(enumerate(banks)))

    def _layer_hook(self, layer: int):
        memory, attractor = self.branches[str(layer)] if str(layer) in self.branches else None, \
            self.attractors[str(layer)] if str(layer) in self.attractors else None

        def residual(x: torch.Tensor) -> torch.Tensor:
            ctx = self._ctx.at(layer)
            if memory is not None:
                x = memory.residual(x, ctx)
            if attractor is not None:  # positions of this forward's tokens, after those already cached
                positions = torch.arange(ctx.past, ctx.past + x.shape[1], device=x.device)
                x = attractor.residual(x, dataclasses.replace(ctx, positions=positions))
            return x

        def hook(module, args, output):
            if isinstance(output, tuple):
                return (residual(output[0]),) + tuple(output[1:])
            return residual(output)
        return hook

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None,
                **kwargs) -> CausalLMOutput:
        """Same contract as MemoryTransformer: logits, loss (mean over labelled tokens), aux_losses.
        Other keyword arguments go to the base model unchanged; its KV cache, if it returns one, is `out.cache`."""
        if document_ids is not None:
            raise ValueError("document_ids (packed documents) are not supported by adapter models; "
                             "set data.document_masking: false")
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits, loss = out.logits, None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        aux, usage = self._routing_stats() if self.memory_config.use_chapters else ({}, {})
        result = CausalLMOutput(logits=logits, loss=loss, aux_losses=aux, chapter_usage=usage)
        hf_cache = find_hf_cache(out.values())
        if hf_cache is not None:
            result["cache"] = hf_cache
        return result

    def _routing_stats(self):
        """Router losses (averaged over memory layers) and chapter usage per layer of the last forward without cache."""
        return routing_stats({i: self.branches[str(i)].attn for i in self.memory_layers})

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, **hf_kwargs) -> torch.Tensor:
        """Hugging Face generate() with its KV cache; memory K/V are computed once per generation.

        Same arguments as MemoryTransformer.generate (temperature 0 = greedy); other keyword
        arguments go to HF generate. HF samples from torch's global RNG: a generator only seeds it.
        Returns prompt + new tokens.
        """
        if generator is not None and temperature > 0:
            torch.manual_seed(generator.initial_seed())
        was_training = self.training
        self.eval()
        sample = temperature > 0
        args = dict(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos_token_id,
                    pad_token_id=self.base.config.pad_token_id if self.base.config.pad_token_id is not None
                    else eos_token_id, attention_mask=torch.ones_like(input_ids))
        if sample:
            args.update(temperature=temperature, top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0)
        else:
            args.update(temperature=None, top_k=None, top_p=None)
        args.update(hf_kwargs)
        try:
            with self.decoding():
                return self.base.generate(input_ids, **args)
        finally:
            self.train(was_training)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[DecodingState]:
        """Open megamem's memory state for HF generation with the base's KV cache: banks and memory K/V
        are computed by the prompt's forward and reused, chapter routing follows routing_strategy_inference.
        `model.generate` uses it; wrap `model.base.generate(...)` in it to call HF generate directly."""
        if self._decoding is not None:
            raise DecodingStateError("memory adapter: decoding() is already open (one generation at a time)")
        self._decoding = DecodingState()
        try:
            yield self._decoding
        finally:
            self._decoding = None
            self._ctx = ForwardContext()

    @property
    def gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.base.modules())

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """HF gradient checkpointing of the base's layers. transformers checkpoints a layer's forward, so
        the memory hooks run outside it; memory.memory_gradient_checkpointing checkpoints the branches."""
        if enabled:
            self.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if not any(p.requires_grad for p in self.base.get_input_embeddings().parameters()):
                self.base.enable_input_require_grads()  # frozen embeddings: checkpointed layers still need grads
        elif self.gradient_checkpointing:
            self.base.activation_checkpointing_disable()

    # ------------------------------------------------------------------- init
    def memory_modules(self) -> List[nn.Module]:
        return list(self.banks.modules()) + list(self.branches.modules()) + list(self.attractors.modules()) + \
            [m for gate in (self.spiral, self.hybrid) if gate is not None for m in gate.modules()]

    def zero_init_ids(self) -> set:
        """Output layers that start at zero: the memory branches' with wo_init_zero, the attractors' always."""
        ids = {id(m) for branch in self.attractors.values() for m in branch.output_layers()}
        if not self.memory_config.wo_init_zero:
            return ids
        return ids | {id(m) for branch in self.branches.values() for m in branch.output_layers()}

    def init_module(self, module: nn.Module, zero_ids: set) -> None:
        """Initialise one memory module (the base keeps its pretrained weights)."""
        if any(module is bank for bank in self.banks) or isinstance(module, ChapterRouter):
            module.reset_parameters()
        elif isinstance(module, (AttractorBranch, SpiralGate, HybridGate)):  # their own parameters: learned α, gates
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            if id(module) in zero_ids:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, std=self.dims.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def reset_parameters(self) -> None:
        zero_ids = self.zero_init_ids()
        for module in self.memory_modules():
            self.init_module(module, zero_ids)

    @property
    def has_injections(self) -> bool:
        """Memory branches, attractors or a position gate: what a plain folder of the base's architecture lacks."""
        return bool(self.memory_layers) or len(self.attractors) > 0 or self.spiral is not None or \
            self.hybrid is not None

    # ------------------------------------------------------------- accounting
    def memory_parameters(self) -> List[nn.Parameter]:
        """Banks, memory branches, attractors, the spiral or hybrid gate: the new parameters (the `memory` part
        and group)."""
        return list(self.banks.parameters()) + list(self.branches.parameters()) + list(self.attractors.parameters()) + \
            [p for gate in (self.spiral, self.hybrid) if gate is not None for p in gate.parameters()]

    def lora_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.base.named_parameters() if is_lora_name(n)]

    def export_names(self) -> List[str]:
        """Parameters and buffers an adapter export holds: memory, LoRA, and the base only when it trains."""
        base_trains = not self.adapter_config.model.freeze_base_model
        names = [n for n, p in self.named_parameters()
                 if not n.startswith("base.") or is_lora_name(n) or (base_trains and p.requires_grad)]
        names += [n for n, _ in self.named_buffers() if n.startswith(("banks.", "branches.", "attractors."))]
        return names

    def parameter_counts(self) -> Dict[str, object]:
        unique = {id(p): p for p in self.parameters()}.values()
        memory_ids = {id(p) for p in self.memory_parameters()}
        lora_ids = {id(p) for p in self.lora_parameters()}
        return {
            "total": sum(full_numel(p) for p in unique),
            "memory": sum(full_numel(p) for p in unique if id(p) in memory_ids),
            "lora": sum(full_numel(p) for p in unique if id(p) in lora_ids),
            "trainable": sum(full_numel(p) for p in unique if p.requires_grad),
            "banks": [{"kind": b.kind, "tokens": b.num_tokens, "dim": b.dim,
                       "parameters": sum(full_numel(p) for p in b.parameters()),
                       "bytes": sum(full_numel(t) * t.element_size() for t in list(b.parameters()) + list(b.buffers())),
                       "layers": [layer for layer, idx in self.bank_of_layer.items() if idx == i]}
                      for i, b in enumerate(self.banks)],
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, matmuls only (megamem.train.metrics.flops_per_token's definition):
        frozen base weights count 4 per element (no weight gradient), trainable ones 6."""
        from ..model.flops import memory_rows_read, weight_flops

        d, mem = self.dims, self.memory_config
        embed = list(self.base.get_input_embeddings().parameters())
        banks = [p for b in self.banks for p in b.parameters()]
        dense = weight_flops(self.parameters(), skip=embed + banks)
        if getattr(self.base.config, "tie_word_embeddings", False):
            dense += weight_flops(embed)
        attn = 6 * 2 * d.num_layers * (seq_len / 2) * d.hidden_size
        heads = mem.memory_num_heads or d.num_heads
        memory = 6 * 2 * len(self.memory_layers) * memory_rows_read(mem) * heads * (d.hidden_size // heads)
        return dense + attn + memory
