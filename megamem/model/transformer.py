"""MemoryTransformer: a decoder-only LM whose blocks may cross-attend to learnable memory banks.

Defined once, without parallelism; ZeRO, expert and pipeline parallelism wrap it from outside.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import MemoryConfig, ModelConfig
from ..memory.bank import bank_dim, build_bank
from ..memory.chapters import routing_stats
from ..memory.placement import bank_assignment, memory_layers, num_banks
from ..ops import Linear
from .attention import document_mask as make_document_mask
from .block import Block
from .kv_cache import KVCache
from .layers import RotaryEmbedding, make_norm
from .sampling import select_next_token


class CausalLMOutput(dict):
    """logits, loss (LM loss, mean over labelled tokens), aux_losses (router losses, logged separately),
    chapter_usage.

    A dict with attribute access: ZeRO-3's hooks look for tensors inside dicts, not other objects.
    """

    def __init__(self, logits: torch.Tensor, loss: Optional[torch.Tensor] = None,
                 aux_losses: Optional[Dict[str, torch.Tensor]] = None,
                 chapter_usage: Optional[Dict[int, torch.Tensor]] = None):
        # chapter_usage: per memory layer, how many units (tokens or sequences) read each chapter
        super().__init__(logits=logits, loss=loss, aux_losses=aux_losses if aux_losses is not None else {},
                         chapter_usage=chapter_usage if chapter_usage is not None else {})

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


class MemoryTransformer(nn.Module):
    def __init__(self, model: ModelConfig, memory: MemoryConfig):
        super().__init__()
        self.model_config, self.memory_config = model, memory
        self.memory_layers: List[int] = memory_layers(memory, model.num_layers)
        self.bank_of_layer: Dict[int, int] = bank_assignment(memory, self.memory_layers)
        width = bank_dim(memory, model.hidden_dim)

        self.tok_embeddings = nn.Embedding(model.vocab_size, model.hidden_dim)
        self.pos_embeddings = None if model.use_rope else nn.Embedding(model.max_seq_len, model.hidden_dim)
        self.rotary = RotaryEmbedding(model.hidden_dim // model.num_heads, model.max_seq_len, model.rope_theta) \
            if model.use_rope else None
        self.dropout = nn.Dropout(model.dropout)
        self.banks = nn.ModuleList(build_bank(memory, model.hidden_dim) for _ in range(num_banks(self.bank_of_layer)))
        self.blocks = nn.ModuleList(
            Block(model, memory, width if i in self.bank_of_layer else None) for i in range(model.num_layers))
        self.norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
        self.lm_head = Linear(model.hidden_dim, model.vocab_size, bias=False)
        self.gradient_checkpointing = False
        if memory.use_chapters and memory.shared_router and self.memory_layers:
            router = self.blocks[self.memory_layers[0]].memory.attn.router
            for i in self.memory_layers[1:]:
                self.blocks[i].memory.attn.router = router
        self.reset_parameters()
        if model.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def reset_parameters(self) -> None:
        zero_ids = self.zero_init_ids()
        for module in self.modules():
            self.init_module(module, zero_ids)

    def init_module(self, module: nn.Module, zero_ids: set) -> None:
        """Initialise one module's own parameters (ZeRO-3 calls this per module, gathered).

        Linear and embedding weights: normal(initializer_range), or zeros for memory outputs when
        wo_init_zero. Other modules with their own reset_parameters (banks, routers, LayerNorm) use it.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if id(module) in zero_ids:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, std=self.model_config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif callable(getattr(module, "reset_parameters", None)) and next(module.parameters(recurse=False), None) \
                is not None:
            module.reset_parameters()

    def zero_init_ids(self) -> set:
        """Output projections of memory branches when wo_init_zero: the memory path starts as identity."""
        if not self.memory_config.wo_init_zero:
            return set()
        return {id(m) for block in self.blocks if block.memory is not None for m in block.memory.output_layers()}

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, document_ids: Optional[torch.Tensor] = None,
                last_logits_only: bool = False) -> CausalLMOutput:
        """document_ids [B, S]: packed documents attend only within themselves (positions stay global).
        last_logits_only: logits of the last position only ([B, 1, V]; what decoding needs)."""
        B, S = input_ids.shape
        past = cache.length if cache is not None else 0
        if last_logits_only and labels is not None:
            raise ValueError("last_logits_only has no logits for the loss over every position; pass one or the other")
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids (packed training rows) cannot be combined with a KV cache")
        doc_mask = make_document_mask(document_ids) if document_ids is not None else None
        if past + S > self.model_config.max_seq_len:
            raise ValueError(f"sequence of {past + S} tokens exceeds model.max_seq_len = {self.model_config.max_seq_len}")
        positions = torch.arange(past, past + S, device=input_ids.device)
        x = self.tok_embeddings(input_ids)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions)
        x = self.dropout(x)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(positions, x.dtype)
        # each bank is materialised once per forward (not per layer), and once per generation when decoding
        bank_tensors = cache.bank_tensors(self.banks) if cache is not None else [bank() for bank in self.banks]
        for i, block in enumerate(self.blocks):
            memory = bank_tensors[self.bank_of_layer[i]] if i in self.bank_of_layer else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, memory, cache, i, doc_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, memory, cache, i, doc_mask)
        if cache is not None:
            cache.advance(S)
        logits = self.lm_head(self.norm(x[:, -1:] if last_logits_only else x))
        loss = None
        if labels is not None:
            # shift the labels, not the logits: no copy of the [B, S, V] logits (nor of their gradient)
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)
        aux, usage = self._routing_stats() if self.memory_config.use_chapters and cache is None else ({}, {})
        return CausalLMOutput(logits=logits, loss=loss, aux_losses=aux, chapter_usage=usage)

    def _routing_stats(self):
        """Router losses averaged over memory layers (already weighted), and chapter usage per layer."""
        return routing_stats({i: self.blocks[i].memory.attn for i in self.memory_layers})

    # --------------------------------------------------------------- generation
    def new_cache(self, batch: int, max_len: int, capacity: Optional[int] = None) -> KVCache:
        """A decoding cache for up to max_len tokens, storage for `capacity` of them allocated now."""
        m = self.model_config
        kv_heads = m.num_kv_heads or m.num_heads
        p = self.tok_embeddings.weight
        return KVCache(m.num_layers, batch, kv_heads, m.hidden_dim // m.num_heads, max_len, p.device, p.dtype,
                       capacity)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decode with a KV cache; memory K/V are computed once, by the prompt's forward.

        Sequences that emit eos are padded with pad_token_id (or eos) until all have stopped.
        """
        B, S = input_ids.shape
        total = min(S + max_new_tokens, self.model_config.max_seq_len)
        if S >= total:
            raise ValueError(f"prompt of {S} tokens leaves no room below model.max_seq_len = "
                             f"{self.model_config.max_seq_len}")
        was_training = self.training
        self.eval()
        cache = self.new_cache(B, total)
        pad = self.model_config.pad_token_id if self.model_config.pad_token_id is not None else eos_token_id
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out, step_input = input_ids, input_ids
        for _ in range(total - S):
            logits = self(step_input, cache=cache, last_logits_only=True).logits[:, -1]
            nxt = select_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done = done | (nxt == eos_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return out

    # ------------------------------------------------------------- accounting
    def memory_parameters(self) -> List[nn.Parameter]:
        """Banks and every memory branch (cross-attention, its norm, layout B's extra MLP)."""
        params = list(self.banks.parameters())
        for block in self.blocks:
            if block.memory is not None:
                params += list(block.memory.parameters())
        return params

    def parameter_counts(self) -> Dict[str, object]:
        unique = {id(p): p for p in self.parameters()}.values()
        memory_ids = {id(p) for p in self.memory_parameters()}
        return {
            "total": sum(p.numel() for p in unique),
            "memory": sum(p.numel() for p in unique if id(p) in memory_ids),
            "trainable": sum(p.numel() for p in unique if p.requires_grad),
            "banks": [{"kind": b.kind, "tokens": b.num_tokens, "dim": b.dim,
                       "parameters": sum(p.numel() for p in b.parameters()),
                       "bytes": sum(t.numel() * t.element_size() for t in list(b.parameters()) + list(b.buffers())),
                       "layers": [layer for layer, idx in self.bank_of_layer.items() if idx == i]}
                      for i, b in enumerate(self.banks)],
        }
