"""MemoryTransformer: a decoder-only LM whose blocks may cross-attend to learnable memory banks.

Defined once, without parallelism; ZeRO, expert and pipeline parallelism wrap it from outside.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import MemoryConfig, ModelConfig
from ..memory.bank import bank_dim, build_bank
from ..memory.placement import bank_assignment, memory_layers, num_banks
from .block import Block
from .kv_cache import KVCache
from .layers import RotaryEmbedding, make_norm
from .sampling import select_next_token


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None  # language-model loss (mean over labelled tokens)
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # router losses, logged separately
    # chapters: per memory layer, how many units (tokens or sequences) read each chapter
    chapter_usage: Dict[int, torch.Tensor] = field(default_factory=dict)


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
        self.lm_head = nn.Linear(model.hidden_dim, model.vocab_size, bias=False)
        self.gradient_checkpointing = False
        if memory.use_chapters and memory.shared_router and self.memory_layers:
            router = self.blocks[self.memory_layers[0]].memory.attn.router
            for i in self.memory_layers[1:]:
                self.blocks[i].memory.attn.router = router
        self.reset_parameters()
        if model.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def reset_parameters(self) -> None:
        std = self.model_config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for bank in self.banks:
            if hasattr(bank, "reset_parameters"):
                bank.reset_parameters()
        if self.memory_config.wo_init_zero:
            for block in self.blocks:
                if block.memory is not None:
                    block.memory.zero_output()

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> CausalLMOutput:
        B, S = input_ids.shape
        past = cache.length if cache is not None else 0
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
        # each bank is materialised once per forward (not per layer); skipped when cached K/V exist
        need_banks = cache is None or len(cache.memory_kv) < len(self.memory_layers) or self.memory_config.use_chapters
        bank_tensors = [bank() for bank in self.banks] if need_banks else [None] * len(self.banks)
        for i, block in enumerate(self.blocks):
            memory = bank_tensors[self.bank_of_layer[i]] if i in self.bank_of_layer else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, memory, cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, memory, cache, i)
        if cache is not None:
            cache.advance(S)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        aux, usage = self._routing_stats() if self.memory_config.use_chapters and cache is None else ({}, {})
        return CausalLMOutput(logits=logits, loss=loss, aux_losses=aux, chapter_usage=usage)

    def _routing_stats(self):
        """Router losses averaged over memory layers (already weighted), and chapter usage per layer."""
        aux, usage = {}, {}
        for i in self.memory_layers:
            attn = self.blocks[i].memory.attn
            if attn.stats is None:
                continue
            _, losses, usage[i] = attn.stats
            for name, value in losses.items():
                aux[name] = aux.get(name, 0.0) + value / len(self.memory_layers)
            attn.stats = None
        return aux, usage

    # --------------------------------------------------------------- generation
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        m = self.model_config
        kv_heads = m.num_kv_heads or m.num_heads
        p = self.tok_embeddings.weight
        return KVCache(m.num_layers, batch, kv_heads, m.hidden_dim // m.num_heads, max_len, p.device, p.dtype)

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
            logits = self(step_input, cache=cache).logits[:, -1]
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
