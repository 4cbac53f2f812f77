"""MLA + PEER + memory on 2 gloo ranks: ZeRO-2 (row-sparse PEER tables) and ZeRO-3 (tables partitioned)
give the losses and exported weights of 1 rank with the whole batch, and a resume equals the unbroken run."""
import torch

from dist_utils import run_ranks
from test_mla import MLA
from test_train import ZERO, _exported, _fit

PEER = ("model.use_peer=true", "model.peer_layer_placement=every_n", "model.peer_layer_n=2",
        "model.peer_config.product_key_dim=[4, 4]", "model.peer_config.num_experts=16",
        "model.peer_config.num_experts_per_tok=3", "model.peer_config.num_heads=2", "model.peer_config.query_dim=8",
        "model.peer_config.batch_norm_query=false",  # BatchNorm statistics would be per rank
        "memory.memory_layer_placement=every_n", "memory.memory_layer_n=2",
        "training.max_steps=4", "training.save_steps=2", "training.learning_rate=0.01")
SPARSE = ("model.peer_config.sparse_tables=true",)


def _run(out, stage, batch, extra):
    result = _fit(out, ZERO[stage], batch, (*MLA, *PEER, *extra))
    result.pop("bank_local", None)
    return result


def _close(a, b, atol):
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


def _gap(a, b):
    """(largest absolute difference, its tensor's name) between two exports' weights (PEER's expert_counts,
    the last forward's per-rank selections, is not exported: a non-persistent buffer)."""
    assert a.keys() == b.keys() and not any(k.endswith("expert_counts") for k in a)
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)


def _check(tmp_path, stage, extra):
    one = run_ranks(_run, str(tmp_path / "one"), stage, 4, extra, world_size=1, tmp_path=tmp_path / "r1")[0]
    two = run_ranks(_run, str(tmp_path / "two"), stage, 2, extra, world_size=2, tmp_path=tmp_path / "r2")[0]
    assert one["train_losses"][0] > one["train_losses"][-1]
    assert _close(two["train_losses"], one["train_losses"], 1e-5), (two["train_losses"], one["train_losses"])
    gap = _gap(_exported(tmp_path / "one"), _exported(tmp_path / "two"))
    assert gap[0] <= 1e-5, gap
    ckpt = tmp_path / "two" / "checkpoints" / "step00000002"
    resumed = run_ranks(_run, str(tmp_path / "two"), stage, 2, (*extra, f"training.resume_from_checkpoint={ckpt}"),
                        world_size=2, tmp_path=tmp_path / "r3")[0]
    assert _close(resumed["train_losses"], two["train_losses"][2:], 1e-6)
    return one, two, ckpt


def test_zero2_sparse_tables_two_ranks_equal_one_and_resume(tmp_path):
    one, two, ckpt = _check(tmp_path, 2, SPARSE)
    engine = {n for names in two["group_names"].values() for n in names}
    assert not any("expert_" in n for n in engine) and "blocks.1.mlp.query.weight" in engine  # tables: outside
    assert "blocks.0.attn.kv_b_proj.weight" in engine and (ckpt / "peer_tables.safetensors").is_file()


def test_zero3_two_ranks_equal_one_and_resume(tmp_path):
    one, two, _ = _check(tmp_path, 3, ())
    assert "blocks.1.mlp.expert_down" in two["group_names"]["base_no_decay"]  # partitioned with the engine
