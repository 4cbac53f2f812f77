"""Expert-parallel chapter shards on 2 CPU ranks: parity with ep_size = 1, and DeepSpeed ZeRO-2 steps."""
import copy

import pytest
import torch

from dist_utils import run_ranks

OVERRIDES = ["memory.use_chapters=true", "memory.num_chapters=4", "memory.num_memory_tokens=32",
             "memory.top_k_chapters=2", "memory.num_shared_chapters=1", "memory.wo_init_zero=false",
             "memory.memory_sharing=per_layer", "memory.memory_layer_placement=last_k", "memory.memory_layer_k=2",
             "memory.use_z_loss=true", "memory.use_auxiliary_loss=true"]


def _models(strategy, *extra):
    from conftest import tiny_config
    from megamem.model import build_model

    cfg = tiny_config(*OVERRIDES, f"memory.routing_strategy_train={strategy}", "parallel.ep_size=2", *extra)
    torch.manual_seed(0)
    ref = build_model(cfg)
    for i in ref.memory_layers:
        torch.nn.init.normal_(ref.blocks[i].memory.attn.router.weight, std=1.0)
    return cfg, ref, copy.deepcopy(ref)


def _parity(strategy):
    import torch.distributed as dist

    from megamem.parallel.expert import apply_expert_parallel

    cfg, ref, ep = _models(strategy)
    rank = dist.get_rank()
    ids = torch.randint(0, 61, (4, 9), generator=torch.Generator().manual_seed(1))
    halves = ids.chunk(2)
    apply_expert_parallel(ep, 2)
    # reference: ep_size = 1 on each half, loss averaged over the two data-parallel ranks
    outs = [ref(h, labels=h) for h in halves]
    sum((o.loss + sum(o.aux_losses.values())) / 2 for o in outs).backward()
    out = ep(halves[rank], labels=halves[rank])
    (out.loss + sum(out.aux_losses.values())).backward()
    errors = {"logits": (out.logits - outs[rank].logits).abs().max().item(),
              "loss": abs(out.loss.item() - outs[rank].loss.item())}
    for name, value in out.aux_losses.items():
        errors[name] = abs(value.item() - outs[rank].aux_losses[name].item())
    ref_params = dict(ref.named_parameters())
    bank_rows = 0
    for name, p in ep.named_parameters():
        g = p.grad.clone()
        if getattr(p, "allreduce", True):  # dense: averaged over data parallel ranks (as DeepSpeed does)
            dist.all_reduce(g)
            g /= 2
            errors[name] = (g - ref_params[name].grad).abs().max().item()
        else:  # expert shard: gradients arrive through the all-to-all; DeepSpeed divides by dp world size
            bank_rows += p.shape[0]
            rows = ref_params[name].shape[0] // 2
            errors[name] = (g / 2 - ref_params[name].grad[rank * rows:(rank + 1) * rows]).abs().max().item()
            assert p.numel() * 2 == ref_params[name].numel()
    return errors, bank_rows, sum(p.numel() for p in ref.banks.parameters())


@pytest.mark.parametrize("strategy", ["token", "sequence"])
def test_ep2_equals_ep1(tmp_path, strategy):
    for errors, bank_rows, ref_bank in run_ranks(_parity, strategy, tmp_path=tmp_path):
        bad = {k: v for k, v in errors.items() if v > 1e-5}
        assert not bad, bad
        assert bank_rows == 2 * 16  # two banks, each rank holds 2 of 4 chapters × 8 rows


def _zero2_steps(sparse):
    import deepspeed
    import torch.distributed as dist

    from megamem.parallel.expert import apply_expert_parallel, optimizer_param_groups
    from megamem.train.sparse_adamw import sparse_bank_optimizer

    results = []
    for ep_size in (1, 2):
        sparse_over = ["memory.sparse_bank_grad=true", "memory.num_chapters=16", "memory.top_k_chapters=1"]
        _, _, model = _models("sequence" if sparse else "token", *(sparse_over if sparse else []))
        C, T = model.memory_config.num_chapters, model.memory_config.num_memory_tokens // 16 if sparse else 8
        if ep_size > 1:
            apply_expert_parallel(model, ep_size)
        banks = list(model.banks.parameters())
        if sparse:  # banks outside the engine: lazy AdamW, reduced over the replicas of each shard
            rows = sparse_bank_optimizer(model, lr=1e-3, weight_decay=0.1)
        # eps 1e-6: Adam divides near-zero router gradients by their own size, turning float rounding
        # (different summation orders with ep_size 1 and 2) into 1e-5 parameter differences
        optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.1), lr=1e-3, eps=1e-6, fused=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9})
        gen = torch.Generator().manual_seed(10 + dist.get_rank())
        losses, read, start = [], set(), [b.detach().clone() for b in banks]
        for _ in range(3):
            ids = torch.randint(0, 61, (2, 9), generator=gen)
            out = engine(ids, labels=ids)
            loss = out.loss + sum(out.aux_losses.values())
            engine.backward(loss)
            engine.step()
            if sparse:
                assert all(b.grad.is_sparse for b in banks)
                rows.step()
                rows.zero_grad(set_to_none=True)
            losses.append(loss.item())
            read |= {(layer, c) for layer, u in out.chapter_usage.items() for c in u.nonzero().flatten().tolist()}
        if sparse and ep_size == 1:  # lazy updates: exactly the chapters some rank read have moved
            reads = [None, None]
            dist.all_gather_object(reads, read)
            moved = {(layer, c) for layer, b, s in zip(sorted(out.chapter_usage), banks, start)
                     for c in range(C) if not torch.equal(b[T * c:T * c + T], s[T * c:T * c + T])}
            assert moved == reads[0] | reads[1] and len(moved) < 2 * C, (moved, reads)
        banks = torch.cat([b.memory.detach().flatten() for b in model.banks])
        if ep_size > 1:  # gather the shards back into whole banks to compare with ep_size = 1
            parts = [torch.empty_like(banks) for _ in range(2)]
            dist.all_gather(parts, banks)
            banks = torch.cat([torch.cat([p.view(2, -1)[i] for p in parts]) for i in range(2)])
        dense = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if not n.startswith("banks")])
        results.append((losses, banks, dense))
    (l1, b1, d1), (l2, b2, d2) = results
    return max(abs(a - b) for a, b in zip(l1, l2)), (b1 - b2).abs().max().item(), (d1 - d2).abs().max().item()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_bank_grad", "row_sparse_bank"])
def test_deepspeed_zero2_trains_with_ep2_like_ep1(tmp_path, sparse):
    """ZeRO-2 steps: ep_size = 2 gives the losses and parameters of ep_size = 1 — with the shards as
    DeepSpeed expert parameters, or row-sparse with RowSparseAdamW outside the engine."""
    for loss_err, bank_err, dense_err in run_ranks(_zero2_steps, sparse, tmp_path=tmp_path):
        assert loss_err < 1e-5 and bank_err < 1e-5 and dense_err < 1e-5, (loss_err, bank_err, dense_err)


def test_zero3_with_expert_parallel_is_refused():
    from conftest import tiny_config
    from megamem.parallel.expert import check_layout

    cfg = tiny_config(*OVERRIDES, "parallel.ep_size=2")
    assert check_layout(cfg, 2) is None
    message = check_layout(cfg, 3)
    assert "ZeRO stage 1 or 2" in message and "parallel.ep_size: 1" in message
