"""Row-sparse bank (and PEER table) gradients: single-process autograd math, no optimiser and no collectives.

With chapters a step reads a few chapters of a bank that may hold 1M rows; a dense gradient of the
whole bank would then cost more than the step itself. With `memory.sparse_bank_grad`, chapter rows
are gathered by `gather_chapters`, whose backward returns a sparse COO gradient holding only the
touched rows. Updating them (and reducing them across ranks) is training's job:
megamem.train.sparse_adamw.RowSparseAdamW.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatherChapters(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, ids, rows_per_chapter):
        ctx.save_for_backward(ids)
        ctx.shape, ctx.rows = memory.shape, rows_per_chapter
        return memory.view(-1, rows_per_chapter, memory.shape[-1])[ids]

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        T, d = ctx.rows, grad.shape[-1]
        chapters, inv = torch.unique(ids.flatten(), return_inverse=True)  # sorted: a coalesced result
        summed = grad.new_zeros(len(chapters), T, d).index_add_(0, inv, grad.reshape(-1, T, d))
        rows = (chapters[:, None] * T + torch.arange(T, device=ids.device)).reshape(1, -1)
        return torch.sparse_coo_tensor(rows, summed.view(-1, d), ctx.shape, check_invariants=False,
                                       is_coalesced=True), None, None


class _KeepChapterRows(torch.autograd.Function):
    """Identity whose backward keeps only the rows of the given chapters, as a sparse gradient."""

    @staticmethod
    def forward(ctx, memory, chapters, rows_per_chapter):
        ctx.save_for_backward(chapters)
        ctx.rows = rows_per_chapter
        return memory.view_as(memory)

    @staticmethod
    def backward(ctx, grad):
        (chapters,) = ctx.saved_tensors
        T, d = ctx.rows, grad.shape[-1]
        values = grad.reshape(-1, T, d)[chapters].reshape(-1, d)
        rows = (chapters[:, None] * T + torch.arange(T, device=chapters.device)).reshape(1, -1)
        return torch.sparse_coo_tensor(rows, values, grad.shape, check_invariants=False, is_coalesced=True), None, None


def keep_chapter_rows(memory: torch.Tensor, chapters: torch.Tensor, rows_per_chapter: int) -> torch.Tensor:
    """The bank itself, whose gradient is made row-sparse (only `chapters`, sorted and unique, kept).

    For reads that touch most of the bank, where gathering rows would copy nearly all of it.
    """
    if torch.is_grad_enabled() and memory.requires_grad:
        return _KeepChapterRows.apply(memory, chapters, rows_per_chapter)
    return memory


def gather_chapters(memory: torch.Tensor, ids: torch.Tensor, rows_per_chapter: int, sparse: bool) -> torch.Tensor:
    """memory [C·T, d] → [*ids.shape, T, d]; with sparse=True the bank gets a row-sparse gradient."""
    if sparse and torch.is_grad_enabled() and memory.requires_grad:
        return _GatherChapters.apply(memory, ids, rows_per_chapter)
    return memory.view(-1, rows_per_chapter, memory.shape[-1])[ids]


def gather_rows(table: torch.Tensor, rows: torch.Tensor, sparse: bool) -> torch.Tensor:
    """table [R, d] → [*rows.shape, d]; with sparse=True the table gets a row-sparse gradient (the read rows,
    repeats summed when coalesced). PEER's expert tables are read this way."""
    return F.embedding(rows, table, sparse=sparse and torch.is_grad_enabled() and table.requires_grad)
