"""Growth through training.init_from: a model that declares parameters its source lacks
(training.init_from_new) starts from the source's weights, the new parameters initialised by policy.
Function-preserving growth is checked against the source model's own logits."""
import pytest
import torch

from megamem.config import ConfigError
from megamem.folders import export_model
from megamem.model import build_model
from megamem.train.init_from import init_from

from conftest import tiny_config

IDS = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))


def source(tmp_path, *overrides):
    """A trained-looking source (random, non-zero everywhere) exported to a folder."""
    cfg = tiny_config(*overrides)
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    export_model(model.state_dict(), cfg, None, str(tmp_path / "src"), 1)
    return model.eval(), str(tmp_path / "src")


def grown(path, *overrides):
    cfg = tiny_config(*overrides, f"training.init_from={path}")
    torch.manual_seed(7)
    model = build_model(cfg)
    init_from(model, cfg, 0)
    return model.eval()


def test_memory_added_to_a_vanilla_model_starts_as_that_model(tmp_path):
    vanilla, path = source(tmp_path, "memory.vanilla_mode=true")
    model = grown(path, "training.init_from_new=['banks.*', 'blocks.*.memory.*']")
    for name, value in vanilla.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert all(torch.count_nonzero(b.memory.attn.o_proj.weight) == 0 for b in model.blocks)  # wo_init_zero
    assert torch.count_nonzero(model.banks[0].memory) > 0  # the bank keeps the model's own init
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, vanilla(IDS).logits)


def test_a_block_grown_at_zeros_is_the_identity(tmp_path):
    small, path = source(tmp_path, "memory.vanilla_mode=true", "model.num_layers=2")
    model = grown(path, "memory.vanilla_mode=true", "model.num_layers=3", "training.init_from_new=['blocks.2.*']",
                  "training.init_from_new_init=zeros")
    assert all(torch.count_nonzero(p) == 0 for p in model.blocks[2].parameters())
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, small(IDS).logits, atol=1e-6, rtol=0)
    # with the model's own init the new block changes the function (so the equality above is the policy's)
    other = grown(path, "memory.vanilla_mode=true", "model.num_layers=3", "training.init_from_new=['blocks.2.*']")
    with torch.no_grad():
        assert not torch.allclose(other(IDS).logits, small(IDS).logits, atol=1e-3)


@pytest.mark.parametrize("new,message", [
    (None, r"missing \['blocks.2.attn.o_proj.weight'.*declares them in training.init_from_new"),
    ("['blocks.9.*']", r"training.init_from_new: 'blocks.9.\*' matches no parameter of this model"),
    ("['blocks.*']", r"training.init_from_new: 'blocks.\*' matches \['blocks.0.attn.o_proj.weight'.*which .*src "
                     r"holds: they load from it"),
])
def test_growth_is_declared_exactly(tmp_path, new, message):
    _, path = source(tmp_path, "memory.vanilla_mode=true", "model.num_layers=2")
    extra = [f"training.init_from_new={new}"] if new else []
    with pytest.raises(ConfigError, match=message):
        grown(path, "memory.vanilla_mode=true", "model.num_layers=3", *extra)


def test_init_from_new_needs_init_from():
    with pytest.raises(ConfigError, match="training.init_from_new names parameters absent from training.init_from"):
        tiny_config("training.init_from_new=['banks.*']")


def _grow_and_train(out, stage, batch, src):
    from test_train import ZERO, _fit

    return _fit(out, ZERO[stage], batch, ("training.max_steps=3", f"training.init_from={src}", "model.num_layers=3",
                                      "training.init_from_new=['blocks.2.*']", "training.init_from_new_init=identity"))


def test_growth_under_zero3_starts_and_trains_like_zero0(tmp_path):
    """ZeRO-3 builds the model partitioned: init_from writes each parameter gathered, then re-partitions it.
    Reference: the same grown run on ZeRO-0 (1 rank), and the source model's own loss on the first batch."""
    from synthetic_data import SyntheticLoader
    from test_train import make_cfg

    from dist_utils import run_ranks

    cfg = make_cfg(tmp_path / "src_run", "model.num_layers=2")
    torch.manual_seed(1)
    small = build_model(cfg)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # trained-looking: no zero output layers
    export_model(small.state_dict(), cfg, None, str(tmp_path / "src"), 1)
    one = run_ranks(_grow_and_train, str(tmp_path / "one"), 0, 4, str(tmp_path / "src"), world_size=1,
                    tmp_path=tmp_path / "r1")[0]
    two = run_ranks(_grow_and_train, str(tmp_path / "two"), 3, 2, str(tmp_path / "src"), world_size=2,
                    tmp_path=tmp_path / "r2")[0]
    batch = next(iter(SyntheticLoader(61, 4, 16)))  # the first global batch (1 x 4 rows, 2 ranks x 2)
    with torch.no_grad():
        first = small.eval()(batch["input_ids"], labels=batch["labels"]).loss.item()
    assert abs(one["train_losses"][0] - first) < 1e-5  # the grown model computes the source's function
    assert torch.allclose(torch.tensor(two["train_losses"]), torch.tensor(one["train_losses"]), atol=1e-4, rtol=0)
    assert one["train_losses"][-1] != one["train_losses"][0]
