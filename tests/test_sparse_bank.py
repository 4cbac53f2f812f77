"""Row-sparse bank gradients equal the dense ones; RowSparseAdamW is AdamW on the touched rows only."""
import pytest
import torch

from megamem.train.sparse_adamw import RowSparseAdamW
from megamem.model import build_model

from conftest import tiny_config


@pytest.mark.parametrize("strategy,form", [("sequence", "absorbed"), ("sequence", "projected"), ("token", "absorbed"),
                                           ("token", "projected")])
def test_sparse_bank_gradient_equals_dense(strategy, form):
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_config(
            "memory.use_chapters=true", "memory.num_chapters=8", "memory.num_memory_tokens=32",
            "memory.top_k_chapters=2", "memory.num_shared_chapters=1", "memory.wo_init_zero=false",
            "memory.memory_layer_placement=last_k", "memory.memory_layer_k=1",
            f"memory.routing_strategy_train={strategy}", f"memory.{strategy}_routing_formulation={form}",
            f"memory.sparse_bank_grad={str(sparse).lower()}"))
        ids = torch.randint(0, 61, (1, 2), generator=torch.Generator().manual_seed(0))
        out = model(ids, labels=ids)
        (out.loss + sum(out.aux_losses.values())).backward()
        grad = model.banks[0].memory.grad
        assert grad.is_sparse == sparse
        grads.append((grad.to_dense() if sparse else grad, out.chapter_usage))
    (dense, usage), (sparse_grad, _) = grads
    assert (dense - sparse_grad).abs().max() <= 1e-6
    touched = set().union(*[set(u.nonzero().flatten().tolist()) for u in usage.values()])
    rows = set(model.banks[0].memory.grad.coalesce().indices()[0].div(4, rounding_mode="floor").tolist())
    assert rows == touched and len(rows) < 8  # only the chapters that were read carry gradient


def test_sparse_gradient_when_most_of_the_bank_is_read():
    """Reads touching more than half the bank use the bank in place; its gradient is still row-sparse."""
    from megamem.memory.chapters import absorbed_pairs

    torch.manual_seed(0)
    memory = torch.randn(8 * 4, 6, requires_grad=True)
    q, tok = torch.randn(5, 2, 6), torch.arange(5).repeat_interleave(2)
    chap, bias = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4]), torch.zeros(10)
    grads = []
    for sparse in (False, True):
        out, lse = absorbed_pairs(q, memory, 4, tok, chap, bias, 0.3, sparse)
        grads.append(torch.autograd.grad((out.sum() + lse.sum()), memory)[0])
    assert grads[1].is_sparse and torch.allclose(grads[1].to_dense(), grads[0], atol=1e-6)
    assert sorted(set(grads[1].indices()[0].div(4, rounding_mode="floor").tolist())) == [0, 1, 2, 3, 4]


def test_row_sparse_adamw_is_adamw_on_touched_rows():
    torch.manual_seed(0)
    p_ref, p_dense, p_sparse = (torch.nn.Parameter(torch.randn(6, 3)) for _ in range(3))
    with torch.no_grad():
        p_dense.copy_(p_ref)
        p_sparse.copy_(p_ref)
    opts = [torch.optim.AdamW([p_ref], lr=0.1, weight_decay=0.1),
            RowSparseAdamW([p_dense], lr=0.1, weight_decay=0.1), RowSparseAdamW([p_sparse], lr=0.1, weight_decay=0.1)]
    rows = torch.tensor([1, 4])
    for _ in range(3):
        g = torch.randn(6, 3)
        g[[0, 2, 3, 5]] = 0
        p_ref.grad, p_dense.grad = g.clone(), g.clone()
        p_sparse.grad = torch.sparse_coo_tensor(rows[None], g[rows], (6, 3), check_invariants=False)
        before = p_sparse.detach().clone()
        for opt in opts:
            opt.step()
        assert torch.allclose(p_dense, p_ref, atol=1e-6)  # dense gradient: exactly AdamW
        assert torch.allclose(p_sparse[rows], p_ref[rows], atol=1e-6)  # touched rows: AdamW
        assert torch.equal(p_sparse[[0, 2, 3, 5]], before[[0, 2, 3, 5]])  # untouched: no decay, no step
    assert opts[2].state[p_sparse]["exp_avg"][[0, 2, 3, 5]].abs().sum() == 0


@pytest.mark.parametrize("rows", [[1, 3, 4], [4, 1, 3], [1, 4, 1, 3, 4]], ids=["sorted", "unsorted", "repeated"])
def test_row_sparse_adamw_takes_uncoalesced_gradients_as_their_dense_sum(rows):
    """autograd hands a leaf its sparse gradient without the coalesced flag: sorted unique rows are used as they
    are (no copy of the values), unsorted or repeated ones coalesced (repeats summed) — AdamW on the dense sum."""
    from megamem.train.sparse_adamw import coalesced

    torch.manual_seed(0)
    ref, mine = torch.nn.Parameter(torch.randn(6, 3)), torch.nn.Parameter(torch.randn(6, 3))
    with torch.no_grad():
        mine.copy_(ref)
    opt_ref, opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.1), RowSparseAdamW([mine], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.randn(len(rows), 3), (6, 3), check_invariants=False)
        assert not grad.is_coalesced()
        ref.grad, mine.grad = grad.to_dense(), grad
        fixed = coalesced(grad)
        assert fixed.is_coalesced() and torch.equal(fixed.to_dense(), grad.to_dense())
        if rows == sorted(set(rows)):
            assert fixed._values().data_ptr() == grad._values().data_ptr()
        opt_ref.step()
        opt.step()
        touched = sorted(set(rows))
        assert torch.allclose(mine[touched], ref[touched], atol=1e-6)


def test_gather_chapters_sparse_gradient_and_block_update():
    """Repeated chapters are summed; whole-chapter blocks are updated like AdamW on those rows."""
    from megamem.memory.sparse_rows import gather_chapters

    torch.manual_seed(0)
    ref, rows = torch.nn.Parameter(torch.randn(32, 3)), torch.nn.Parameter(torch.randn(32, 3))
    with torch.no_grad():
        rows.copy_(ref)
    ids = torch.tensor([[1, 5], [5, 2]])
    opt_ref = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.1)
    opt = RowSparseAdamW([rows], lr=0.1, weight_decay=0.1, block_rows=4)
    touched = [4 * c + i for c in (1, 2, 5) for i in range(4)]
    for _ in range(3):
        w = torch.randn(2, 2, 4, 3)
        (ref.view(8, 4, 3)[ids] * w).sum().backward()
        (gather_chapters(rows, ids, 4, True) * w).sum().backward()
        assert rows.grad.is_sparse and torch.allclose(ref.grad, rows.grad.to_dense())
        before = rows.detach().clone()
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad()
        assert torch.allclose(ref[touched], rows[touched], atol=1e-6)
        assert torch.equal(rows[:4], before[:4])


def test_row_sparse_adamw_clips_by_the_joint_norm():
    """max_grad_norm: sparse and dense bank gradients are clipped together, as clip_grad_norm_ then AdamW."""
    torch.manual_seed(0)
    refs = [torch.nn.Parameter(torch.randn(8, 3)) for _ in range(2)]
    mine = [torch.nn.Parameter(r.detach().clone()) for r in refs]
    opt_ref = torch.optim.AdamW(refs, lr=0.1, weight_decay=0.1)
    opt = RowSparseAdamW(mine, lr=0.1, weight_decay=0.1, block_rows=4, max_grad_norm=0.5)
    for _ in range(2):
        g0, g1 = torch.zeros(8, 3), torch.randn(8, 3) * 3
        g0[4:] = torch.randn(4, 3) * 3  # chapter 1 of the first bank only
        refs[0].grad, refs[1].grad = g0.clone(), g1.clone()
        assert torch.nn.utils.clip_grad_norm_(refs, 0.5) > 0.5  # clipping is active
        mine[0].grad = torch.sparse_coo_tensor(torch.arange(4, 8)[None], g0[4:], (8, 3), check_invariants=False)
        mine[1].grad = g1.clone()
        before = mine[0].detach().clone()
        opt_ref.step()
        opt.step()
        assert torch.allclose(mine[1], refs[1], atol=1e-6) and torch.allclose(mine[0][4:], refs[0][4:], atol=1e-6)
        assert torch.equal(mine[0][:4], before[:4])  # the untouched chapter does not move
