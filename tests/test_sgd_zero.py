"""training.optimizer: sgd under ZeRO stages: DeepSpeed only lists the optimizers it has tested, so megamem
allows SGD explicitly (its update is elementwise, exact on each rank's partition)."""
import pytest
import torch

from dist_utils import run_ranks
from megamem.config import ConfigError
from megamem.train.ds_config import resolve_ds_config
from test_train import ZERO, _fit, make_cfg

STEPS = ("training.max_steps=4", "training.optimizer=sgd")


def test_sgd_under_zero_1_and_3_trains_like_zero_0(tmp_path):
    ref = run_ranks(_fit, str(tmp_path / "z0"), ZERO[0], 4, STEPS, world_size=1, tmp_path=tmp_path / "r0")[0]
    assert ref["train_losses"][0] > ref["train_losses"][-1]
    for stage in (1, 3):
        got = run_ranks(_fit, str(tmp_path / f"z{stage}"), ZERO[stage], 4, STEPS, world_size=1,
                        tmp_path=tmp_path / f"r{stage}")[0]
        assert torch.allclose(torch.tensor(got["train_losses"]), torch.tensor(ref["train_losses"]), atol=1e-5, rtol=0)


def test_a_json_that_forbids_untested_optimizers_is_refused_in_one_line(tmp_path):
    path = tmp_path / "z1.json"
    path.write_text('{"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": false}')
    with pytest.raises(ConfigError, match="zero_allow_untested_optimizer = False conflicts with training.optimizer"):
        resolve_ds_config(str(path), make_cfg(tmp_path, "training.optimizer=sgd"), 1)
