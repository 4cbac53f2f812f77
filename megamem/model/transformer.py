"""MemoryTransformer: a decoder-only LM whose blocks may cross-attend to learnable memory banks.

Defined once, without parallelism; ZeRO, expert and pipeline parallelism wrap it from outside.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, MemoryConfig, ModelConfig
from ..memory.bank import build_bank
from ..memory.chapters import routing_stats
from ..memory.placement import bank_assignment, memory_layers, num_banks
from ..ops import Linear, seeded_normal_
from .block import Block
from .context import forward_context
from .decoding_cache import DecodingCache
from .layers import make_norm
from .loss import lm_loss
from .positions import build_positions
from .sampling import select_next_token


MEMORY_SEED_OFFSET = 0x6D656D  # memory init: seed + this, so it never reuses the base weights' stream


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

        # construction draws from the global stream; undone, so reset_parameters draws what it would alone
        with torch.random.fork_rng(devices=[]):
            self.tok_embeddings = nn.Embedding(model.vocab_size, model.hidden_dim)
            # the positional encoding (model.pos_encoding.type); named as learned positions' checkpoint key
            self.pos_embeddings = build_positions(model)
            self.dropout = nn.Dropout(model.dropout)
            self.banks = nn.ModuleList(build_bank(memory, model.hidden_dim) for _ in range(num_banks(self.bank_of_layer)))
            self.blocks = nn.ModuleList(Block(model, memory, i) for i in range(model.num_layers))
            self.norm = make_norm(model.hidden_dim, model.norm_eps, model.use_rms_norm)
            self.lm_head = Linear(model.hidden_dim, model.vocab_size, bias=False)
            if memory.use_chapters and memory.shared_router and self.memory_layers:
                router = self.blocks[self.memory_layers[0]].memory.attn.router
                for i in self.memory_layers[1:]:
                    self.blocks[i].memory.attn.router = router
        self.reset_parameters()
        if model.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def reset_parameters(self, seed: Optional[int] = None) -> None:
        """Non-memory weights from torch's global stream, memory weights from memory_generator(seed): a vanilla
        twin built from the same seed gets bitwise the same non-memory weights. seed: default torch.initial_seed()."""
        zero_ids, memory_ids, generator = self.zero_init_ids(), self.memory_module_ids(), self.memory_generator(seed)
        for module in self.modules():
            self.init_module(module, zero_ids, generator if id(module) in memory_ids else None)

    @staticmethod
    def memory_generator(seed: Optional[int] = None) -> torch.Generator:
        """The memory's own CPU generator, seeded from the run seed (never advancing the global stream)."""
        return torch.Generator().manual_seed((torch.initial_seed() if seed is None else seed) + MEMORY_SEED_OFFSET)

    def memory_module_ids(self) -> set:
        """Modules initialised from the memory generator: the banks and every memory-group branch."""
        modules = list(self.banks.modules())
        for block in self.blocks:
            modules += [m for _, branch in block.branches() if branch.param_group == "memory" for m in branch.modules()]
        return {id(m) for m in modules}

    def init_module(self, module: nn.Module, zero_ids: set, generator: Optional[torch.Generator] = None) -> None:
        """Initialise one module's own parameters (ZeRO-3 calls this per module, gathered).

        Linear and embedding weights: normal(initializer_range), or zeros for memory outputs when
        wo_init_zero. Other modules with their own reset_parameters (banks, routers, LayerNorm) use it.
        generator: memory modules draw from it (megamem.ops.seeded_normal_), not from the global stream.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if id(module) in zero_ids:
                nn.init.zeros_(module.weight)
            else:
                seeded_normal_(module.weight, self.model_config.initializer_range, generator)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif callable(getattr(module, "reset_parameters", None)) and next(module.parameters(recurse=False), None) \
                is not None:
            if generator is not None and "generator" in inspect.signature(module.reset_parameters).parameters:
                module.reset_parameters(generator=generator)
            elif generator is not None:  # a memory module without a generator: it must not shift the global stream
                with torch.random.fork_rng(devices=[]):
                    module.reset_parameters()
            else:
                module.reset_parameters()

    def zero_init_ids(self) -> set:
        """Output layers of every residual branch when wo_init_zero (always for a branch with always_zero_init,
        e.g. the attractor): each branch starts as identity."""
        wo = self.memory_config.wo_init_zero
        return {id(m) for block in self.blocks for _, branch in block.branches()
                if wo or branch.always_zero_init for m in branch.output_layers()}

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cache: Optional[DecodingCache] = None, document_ids: Optional[torch.Tensor] = None,
                last_logits_only: bool = False) -> CausalLMOutput:
        """document_ids [B, S]: packed documents attend only within themselves (positions stay global).
        last_logits_only: logits of the last position only ([B, 1, V]; what decoding needs)."""
        B, S = input_ids.shape
        past = cache.length if cache is not None else 0
        if last_logits_only and labels is not None:
            raise ValueError("last_logits_only has no logits for the loss over every position; pass one or the other")
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids (packed training rows) cannot be combined with a KV cache")
        causal = self.model_config.attention_mode == "causal"
        if cache is not None and not causal:
            raise ConfigError(self._causal_only("a KV cache"))
        if past + S > self.model_config.max_seq_len:
            raise ValueError(f"sequence of {past + S} tokens exceeds model.max_seq_len = {self.model_config.max_seq_len}")
        # each bank is materialised once per forward (not per layer), and once per generation when decoding
        banks = cache.bank_tensors(self.banks) if cache is not None else [bank() for bank in self.banks]
        ctx = forward_context(self.pos_embeddings, S, input_ids.device, self.tok_embeddings.weight.dtype, cache,
                              document_ids, dict(enumerate(banks)), causal)
        x = self.dropout(self.pos_embeddings.embed(self.tok_embeddings(input_ids), ctx.positions))
        for i, block in enumerate(self.blocks):
            x = block(x, ctx.at(i))
        if cache is not None:
            cache.advance(S)
        logits = self.lm_head(self.norm(x[:, -1:] if last_logits_only else x))
        loss = lm_loss(self.model_config.attention_mode)(logits, labels) if labels is not None else None
        aux, usage = self._routing_stats() if self.memory_config.use_chapters and cache is None else ({}, {})
        return CausalLMOutput(logits=logits, loss=loss, aux_losses=aux, chapter_usage=usage)

    def _causal_only(self, what: str) -> str:
        from ..config.masking import causal_only_problem

        return causal_only_problem(self.model_config, what)

    def _routing_stats(self):
        """Router losses averaged over memory layers (already weighted), and chapter usage per layer."""
        return routing_stats({i: self.blocks[i].memory.attn for i in self.memory_layers})

    # --------------------------------------------------------------- generation
    def new_cache(self, batch: int, max_len: int, capacity: Optional[int] = None) -> DecodingCache:
        """A decoding cache for up to max_len tokens; each layer's K/V storage starts with `capacity` of them.
        (batch: kept for callers; storage takes its shape from the first forward.)"""
        return DecodingCache(max_len, capacity)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decode with a KV cache; memory K/V are computed once, by the prompt's forward.

        Sequences that emit eos are padded with pad_token_id (or eos) until all have stopped.
        """
        if self.model_config.attention_mode != "causal":
            raise ConfigError(self._causal_only("generate() (decoding with a KV cache)"))
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
        """Banks and every branch in the memory parameter group (cross-attention, its norm, layout B's MLP)."""
        params = list(self.banks.parameters())
        for block in self.blocks:
            for _, branch in block.branches():
                if branch.param_group == "memory":
                    params += list(branch.parameters())
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
