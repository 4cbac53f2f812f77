"""Training objectives as batch transforms: causal LM (the batch as it is) and masked denoising.

Masked denoising (training.time_step_masking, docs/progressive.md#masked-denoising): for the batch's
time step t with fraction f = f_t, each row with n labelled positions gets the mask token at
⌊n·f⌋ of them (at least one when n > 0), chosen uniformly without replacement; its labels are the
original tokens there and -100 everywhere else, and the model (bidirectional attention) is scored at
the same positions (megamem.model.loss.masked_lm_loss). Masks are drawn from a generator seeded by
(training.seed, data rank, step, micro-batch, skipped micro-batches) — a different mask for every
row at every step, the same after a resume — and evaluation masks by (seed, data rank, batch index),
the same at every evaluation.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..config import ConfigError, MegamemConfig
from ..config.masking import block_time_step, mask_fractions, time_step_selection

Batch = Dict[str, torch.Tensor]
TRAIN, EVAL = 0, 1  # streams of the mask seeds


def mask_batch(batch: Batch, fraction: float, mask_token_id: int, generator: torch.Generator) -> Batch:
    """The batch with ⌊n·fraction⌋ labelled positions per row masked (n = the row's labelled positions)."""
    ids, labels = batch["input_ids"], batch.get("labels", batch["input_ids"])
    valid = labels != -100
    n = valid.sum(dim=1, keepdim=True)
    k = torch.maximum(torch.floor(n.double() * fraction).long(), n.clamp(max=1))
    scores = torch.rand(ids.shape, generator=generator, dtype=torch.float64)
    scores = scores.masked_fill(~valid.cpu(), 2.0).to(ids.device)  # unlabelled positions sort last
    rank = scores.argsort(dim=1).argsort(dim=1)  # each position's place in its row's random order
    masked = rank < k
    out = dict(batch)
    out["input_ids"] = ids.masked_fill(masked, mask_token_id)
    out["labels"] = labels.masked_fill(~masked, -100)
    return out


def seeded(*key: int) -> torch.Generator:
    """A CPU generator for one batch, from integers (no global stream touched)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


class CausalLM:
    """The batch as the loader made it; the loss predicts the next token."""

    fraction_logged = False

    def train_batch(self, batch: Batch, step: int, micro: int, skipped: int) -> Tuple[Batch, Optional[float]]:
        return batch, None

    def eval_batch(self, batch: Batch, index: int) -> Tuple[Batch, Optional[float]]:
        return batch, None

    @staticmethod
    def scored(labels: torch.Tensor) -> int:
        """Tokens the loss averages over (position t predicts label t+1)."""
        return int((labels[:, 1:] != -100).sum())


class MaskedDenoising:
    fraction_logged = True

    def __init__(self, cfg: MegamemConfig, tokenizer, data_rank: int):
        t = cfg.training
        self.mask_token_id = t.mask_token_id if t.mask_token_id is not None else getattr(tokenizer, "mask_token_id",
                                                                                         None)
        if self.mask_token_id is None:
            raise ConfigError("training.time_step_masking needs a mask token: set training.mask_token_id (an id below "
                              "model.vocab_size that the data never contains, e.g. an unused special token) or use a "
                              "tokenizer with a mask token")
        if not 0 <= self.mask_token_id < cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer's mask token id {self.mask_token_id} is outside the vocabulary "
                              f"[0, {cfg.model.vocab_size}); set training.mask_token_id")
        self.fractions = mask_fractions(t)
        self.fixed_step = block_time_step(cfg) if time_step_selection(t) == "block" else None
        self.seed, self.rank = t.seed, data_rank

    def _apply(self, batch: Batch, generator: torch.Generator) -> Tuple[Batch, float]:
        step = self.fixed_step
        if step is None:  # t uniform over 0 … T−1, per batch
            step = int(torch.randint(len(self.fractions), (1,), generator=generator))
        fraction = self.fractions[step]
        return mask_batch(batch, fraction, self.mask_token_id, generator), fraction

    def train_batch(self, batch: Batch, step: int, micro: int, skipped: int) -> Tuple[Batch, float]:
        return self._apply(batch, seeded(self.seed, TRAIN, self.rank, step, micro, skipped))

    def eval_batch(self, batch: Batch, index: int) -> Tuple[Batch, float]:
        return self._apply(batch, seeded(self.seed, EVAL, self.rank, index))

    @staticmethod
    def scored(labels: torch.Tensor) -> int:
        """Tokens the loss averages over: the masked positions."""
        return int((labels != -100).sum())


def build_objective(cfg: MegamemConfig, tokenizer, data_rank: int):
    return MaskedDenoising(cfg, tokenizer, data_rank) if cfg.training.time_step_masking else CausalLM()
