"""Pipeline parallelism: MemoryTransformer's layers as a DeepSpeed PipelineModule.

The model stays defined once (megamem.model). Every rank builds the plain model with the run's
seed, then keeps only its stage's submodules, wrapped as pipeline layers:

    0        EmbeddingPipe   tok_embeddings (+ pos_embeddings)      TiedLayerSpec "embeddings" if tied
    1..L     BlockPipe       blocks.i (+ the bank it reads, banks.k)
    L+1      HeadPipe        norm + lm_head        (tied: NormPipe, then the tied embedding as head)

So the same seed gives the same weights as a plain run, and a pipeline layer's state-dict keys map
to plain names by prefix (`layer_plan`; the conversions live in pipeline_state.py). Activations
between layers are tuples (hidden, aux[, document_ids]): `aux` is a float vector carrying the chapters' router losses
(one slot per enabled loss, already averaged over memory layers) from the layers that compute
them to the loss on the last stage, where loss = LM loss + aux.sum() as in the plain trainer.

A bank read by layers on several stages stays ONE bank: each of those stages holds a copy
(identical at init: same seed), and its gradient is all-reduced among exactly those stages before
the optimizer step, through DeepSpeed's tied-weight hook (`get_tied_weights_and_groups`). Equal
gradients and equal optimizer state keep the copies identical; gradient-norm clipping counts the
copy once. A router shared by memory layers (memory.shared_router) is tied the same way.

Cost: each rank builds the whole plain model once on CPU before dropping the other stages' layers
(seed-exact init); a model that does not fit one host's memory needs per-stage initialisation.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import PipelineModule, TiedLayerSpec

from ..comm import all_gather_object, all_reduce, broadcast
from ..config import MegamemConfig
from ..memory.placement import memory_layers
from ..model.context import forward_context
from ..model.loss import causal_lm_loss
from .pipeline_state import (canonical_state, layer_plan, plain_aliases, plain_name,  # noqa: F401 (re-exported)
                             plain_state_dict_from_checkpoint, to_plain_names)

TIED = "embeddings"


def aux_loss_names(cfg: MegamemConfig) -> List[str]:
    """Router losses a chapter model reports, in the order of megamem.memory.router.router_losses."""
    mem = cfg.memory
    if not (mem.use_chapters and memory_layers(mem, cfg.model.num_layers)):
        return []
    flags = (("load_balance_loss", mem.use_load_balance_loss), ("auxiliary_loss", mem.use_auxiliary_loss),
             ("z_loss", mem.use_z_loss))
    return [name for name, on in flags if on]


class EmbeddingPipe(nn.Module):
    """input_ids [, document_ids] → (hidden, aux = zeros, [document_ids])."""

    def __init__(self, tok_embeddings: nn.Embedding, pos_embeddings: nn.Module, dropout: nn.Module, num_aux: int):
        super().__init__()
        self.tok_embeddings, self.pos_embeddings, self.dropout = tok_embeddings, pos_embeddings, dropout
        self.num_aux = max(num_aux, 1)  # DeepSpeed sends no empty tensors; an unused slot stays 0

    def forward(self, inputs):
        input_ids, *rest = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.pos_embeddings.embed(self.tok_embeddings(input_ids), positions)
        # a leaf that requires grad: DeepSpeed back-propagates into every float tensor it sends
        aux = torch.zeros(self.num_aux, device=x.device, requires_grad=torch.is_grad_enabled())
        return (self.dropout(x), aux, *rest)


def tied_head(embedding: EmbeddingPipe, inputs):
    """The tied embedding as output head: logits = hidden · Eᵀ."""
    x, aux = inputs[0], inputs[1]
    return F.linear(x, embedding.tok_embeddings.weight), aux


class BlockPipe(nn.Module):
    """One decoder block run through Block.forward with the same ForwardContext a plain forward builds;
    a memory block also holds the bank it reads (shared with other blocks)."""

    def __init__(self, block: nn.Module, layer: int, encoding: nn.Module, bank: Optional[nn.Module],
                 bank_index: Optional[int], aux_names: List[str], num_memory_layers: int):
        super().__init__()
        self.block, self.layer, self.bank, self.bank_index = block, layer, bank, bank_index
        if next(encoding.parameters(), None) is None:
            self.encoding = encoding  # buffers only (RoPE's inv_freq): moves with the stage
        else:  # learned positions: their weights live on the embedding stage; blocks use no hook of theirs
            self.__dict__["encoding"] = encoding
        self.aux_names, self.num_memory_layers = aux_names, max(num_memory_layers, 1)

    def forward(self, inputs):
        x, aux, *rest = inputs
        banks = {self.bank_index: self.bank()} if self.bank is not None else {}
        ctx = forward_context(self.encoding, x.shape[1], x.device, x.dtype, None, rest[0] if rest else None, banks)
        x = self.block(x, ctx.at(self.layer))
        attn = self.block.memory.attn if self.block.memory is not None else None
        if getattr(attn, "stats", None) is not None:  # chapters: this layer's router losses join the carried sum
            losses = attn.stats[1]
            attn.stats = None
            if self.aux_names:
                aux = aux + torch.stack([losses[n].float() for n in self.aux_names]) / self.num_memory_layers
        return (x, aux, *rest)


class NormPipe(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs):
        return (self.norm(inputs[0]), *inputs[1:])


class HeadPipe(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, inputs):
        return self.lm_head(self.norm(inputs[0])), inputs[1]


class PipelineLoss:
    """Last stage: LM loss + carried router losses in training, the LM loss alone in evaluation.

    Keeps the micro-batch's parts for DeepSpeed's get_additional_losses (logged per name).
    """

    def __init__(self, aux_names: List[str]):
        self.aux_names = aux_names
        self.last: "OrderedDict[str, torch.Tensor]" = self.zeros()

    def zeros(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((n, torch.zeros(())) for n in ["lm_loss", *self.aux_names])

    def __call__(self, outputs, labels):
        logits, aux = outputs
        lm = causal_lm_loss(logits, labels)
        self.last = OrderedDict([("lm_loss", lm.detach()),
                                 *((n, aux[i].detach()) for i, n in enumerate(self.aux_names))])
        return lm + aux.sum() if torch.is_grad_enabled() else lm


# ------------------------------------------------------------------ module
class MemoryPipelineModule(PipelineModule):
    def __init__(self, cfg: MegamemConfig, plain: nn.Module, num_stages: int, partition: str = "parameters",
                 activation_checkpoint_interval: int = 0):
        plan = layer_plan(cfg)
        aux = aux_loss_names(cfg)
        loss = PipelineLoss(aux)
        specs: List[Any] = []
        for entry in plan:
            kind = entry["kind"]
            if kind == "embed":
                args = (plain.tok_embeddings, plain.pos_embeddings, plain.dropout, len(aux))
                specs.append(TiedLayerSpec(TIED, EmbeddingPipe, *args, tied_weight_attr=["tok_embeddings.weight"])
                             if cfg.model.tie_embeddings else EmbeddingPipe(*args))
            elif kind == "block":
                i = entry["layer"]
                index = plain.bank_of_layer.get(i)
                bank = plain.banks[index] if index is not None else None
                specs.append(BlockPipe(plain.blocks[i], i, plain.pos_embeddings, bank, index, aux,
                                       len(plain.memory_layers)))
            elif kind == "norm":
                specs.append(NormPipe(plain.norm))
            elif kind == "tied_head":
                specs.append(TiedLayerSpec(TIED, EmbeddingPipe, *args, forward_fn=tied_head,
                                           tied_weight_attr=["tok_embeddings.weight"]))
            else:
                specs.append(HeadPipe(plain.norm, plain.lm_head))
        super().__init__(specs, num_stages=num_stages, loss_fn=loss, partition_method=partition,
                         activation_checkpoint_interval=activation_checkpoint_interval, dynamic_shape=True,
                         checkpointable_layers=["BlockPipe"])  # recompute blocks; the embedding's input has no grad
        self.cfg, self.plan, self.pipe_loss = cfg, plan, loss
        # other stages' layers are not needed any more: let them go
        self._layer_specs = [s if self._local_start <= i < self._local_stop else None
                             for i, s in enumerate(self._layer_specs)]
        self.shared_ties = self._index_shared_modules()
        self._synchronize_tied_weights()
        # DeepSpeed's fp32 gradient clipping (ZeRO-0) sums the norms of stages > 0 only for parameters
        # flagged model_parallel; flag every parameter but the replicated copies of tied ones, so the
        # clipping norm spans all stages and counts each weight once (ZeRO-1 and bf16 ignore the flag)
        for p in self.parameters():
            p.model_parallel = not getattr(p, "ds_pipe_replicated", False)

    # ---------------------------------------------------------- shared modules
    def _local_layer(self, index: int):
        return self.forward_funcs[index - self._local_start]

    def _index_shared_modules(self) -> Dict[str, Dict[str, Any]]:
        """Banks (and a shared router) read on several stages: one process group per tie, like TiedLayerSpec."""
        ties = {}
        for key in sorted({k for e in self.plan for k in e.get("ties", {})}):
            holders = [i for i, e in enumerate(self.plan) if key in e.get("ties", {})]
            stages = sorted({self.stage_owner(i) for i in holders})
            if len(stages) < 2:
                continue
            for dp in range(self._grid.data_parallel_size):
                ranks = [self._grid.stage_to_global(stage_id=s, data=dp) for s in stages]
                group = torch.distributed.new_group(ranks=ranks)  # every rank joins every group's creation
                if self.global_rank not in ranks:
                    continue
                local = next(i for i in holders if self._local_start <= i < self._local_stop)
                module = self._recursive_getattr(self._local_layer(local), self.plan[local]["ties"][key])
                params = [p for p in module.parameters() if p.requires_grad]
                ties[key] = {"ranks": ranks, "group": group, "params": params, "module": module}
                if self.global_rank != ranks[0]:  # count the copy once in the gradient norm
                    for p in params:
                        p.ds_pipe_replicated = True
        return ties

    def get_tied_weights_and_groups(self):
        pairs = super().get_tied_weights_and_groups()
        for tie in getattr(self, "shared_ties", {}).values():
            pairs += [(p, tie["group"]) for p in tie["params"]]
        return pairs

    def allreduce_tied_weight_gradients(self):
        for weight, group in self.get_tied_weights_and_groups():
            if weight.grad is not None:
                all_reduce(weight.grad, group=group)

    @torch.no_grad()  # DeepSpeed broadcasts into the parameters themselves: keep that out of autograd
    def _synchronize_tied_weights(self):
        super()._synchronize_tied_weights()
        for tie in getattr(self, "shared_ties", {}).values():
            for t in list(tie["module"].parameters()) + list(tie["module"].buffers()):
                broadcast(t.data, src=tie["ranks"][0], group=tie["group"])

    # ------------------------------------------------------------- accounting
    def get_additional_losses(self):
        """lm_loss and each router loss, per micro-batch (DeepSpeed averages them into agg_additional_losses)."""
        return self.pipe_loss.last if self.is_last_stage() else self.pipe_loss.zeros()

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    @property
    def banks(self) -> List[nn.Module]:
        """This stage's banks (megamem.train.optim leaves them out of weight decay)."""
        found = {id(f.bank): f.bank for f in self.forward_funcs if isinstance(f, BlockPipe) and f.bank is not None}
        return list(found.values())

    def memory_parameters(self) -> List[nn.Parameter]:
        params = [p for bank in self.banks for p in bank.parameters()]
        for f in self.forward_funcs:
            if isinstance(f, BlockPipe):
                params += [p for _, b in f.block.branches() if b.param_group == "memory" for p in b.parameters()]
        return params

    def flops_per_token(self, seq_len: int) -> float:
        """The whole model's (megamem.model.flops counts every stage, like every data-parallel rank)."""
        from ..model import build_model
        from ..model.flops import flops_per_token

        with torch.device("meta"):
            return flops_per_token(build_model(self.cfg), seq_len)

    def load_plain_state_dict(self, state: Dict[str, torch.Tensor], where: str, new: Iterable[str] = ()) -> None:
        """Load this stage's layers from a plain state dict (an export, or another layout's weights);
        parameters named in `new` (plain names, declared by training.init_from_new) keep their init."""
        from ..config import ConfigError
        from .weights import check_shapes

        aliases = plain_aliases(self.cfg)
        for i in range(self._local_start, self._local_stop):
            layer, names = self._local_layer(i), self.plan[i]["names"]
            if not isinstance(layer, nn.Module):
                continue
            wanted = {k: aliases.get(plain_name(k, names), plain_name(k, names)) for k in layer.state_dict()}
            new = set(new)
            missing = sorted(v for v in wanted.values() if v not in state and v not in new)
            if missing:
                raise ConfigError(f"training.init_from: {where} has no weights for {missing[:5]} (saved from a "
                                  "different model config? a model that adds parameters declares them in "
                                  "training.init_from_new)")
            mine = {k: state[v] for k, v in wanted.items() if v in state}
            check_shapes({k: v.shape for k, v in layer.state_dict().items()}, mine, where)
            layer.load_state_dict(mine, strict=False)
        self._synchronize_tied_weights()

    def plain_named_parameters(self):
        """(plain MemoryTransformer name, parameter) of this stage's layers."""
        for i in range(self._local_start, self._local_stop):
            layer = self._local_layer(i)
            if isinstance(layer, nn.Module):
                for k, p in layer.named_parameters(remove_duplicate=False):
                    yield plain_name(k, self.plan[i]["names"]), p

    def plain_state_dict(self) -> Dict[str, torch.Tensor]:
        """This stage's weights under plain MemoryTransformer names (shared modules under every alias)."""
        out: Dict[str, torch.Tensor] = {}
        for i in range(self._local_start, self._local_stop):
            layer = self._local_layer(i)
            if isinstance(layer, nn.Module):
                out.update(to_plain_names(layer.state_dict(), self.plan[i]["names"]))
        return out


def build_pipeline_model(cfg: MegamemConfig, ds_config: Dict[str, Any], seed: int) -> MemoryPipelineModule:
    """The plain model with this seed (as a ZeRO-0/1 run builds it), cut into the configured stages."""
    from .layout import pipeline_stages
    from .zero import build_model_for_zero

    plain = build_model_for_zero(cfg, ds_config, 0, seed)
    return MemoryPipelineModule(cfg, plain, pipeline_stages(ds_config), cfg.parallel.pipeline_partition,
                                cfg.parallel.activation_checkpoint_interval)


def pipe_batch(batch: Dict[str, torch.Tensor]):
    """A loader batch → DeepSpeed's (inputs, labels): inputs are input_ids (+ document_ids of packed rows)."""
    inputs = batch["input_ids"] if "document_ids" not in batch else (batch["input_ids"], batch["document_ids"])
    return inputs, batch["labels"]


def gathered_plain_state_dict(module: MemoryPipelineModule, dtype: torch.dtype, rank: int) -> Dict[str, torch.Tensor]:
    """The whole model under plain names on rank 0 (empty elsewhere): every stage sends its layers."""
    local = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu() for k, v in
             module.plain_state_dict().items()}  # on the CPU: pickled GPU tensors would unpickle onto GPUs
    parts: List[Optional[Dict[str, torch.Tensor]]] = all_gather_object(local)
    if rank != 0:
        return {}
    found: Dict[str, torch.Tensor] = {}
    for part in parts:
        found.update(part)
    return {k: v.clone().contiguous() for k, v in canonical_state(found, module.cfg, "pipeline export").items()}


__all__ = ["MemoryPipelineModule", "build_pipeline_model", "layer_plan", "pipe_batch", "aux_loss_names",
           "gathered_plain_state_dict", "plain_state_dict_from_checkpoint"]
