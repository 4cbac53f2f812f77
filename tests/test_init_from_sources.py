"""training.init_from reads every source the Hugging Face converter reads (one reader:
megamem.parallel.weights.read_weights): ZeRO-0 and ZeRO-3 checkpoints, and expert-parallel chapter
shards, each giving exactly the weights of the run's final export."""
import pytest
import torch

from megamem.hf.convert import read_source
from megamem.model import build_model
from megamem.train.init_from import init_from

from dist_utils import run_ranks
from test_train import CHAPTERS, ZERO, _banks_run, _exported, _fit, make_cfg

RUNS = {  # name: (function, arguments after the output folder, ranks, the run's config overrides)
    "zero0": (_fit, (ZERO[0], 2, ("training.max_steps=2", "model.tie_embeddings=true", *CHAPTERS)), 1,
              ("model.tie_embeddings=true", *CHAPTERS)),
    "zero3": (_fit, (ZERO[3], 2, ("training.max_steps=2", "model.tie_embeddings=true", *CHAPTERS)), 2,
              ("model.tie_embeddings=true", *CHAPTERS)),
    "expert_parallel": (_banks_run, (2, 2, ()), 2, ("parallel.ep_size=2", *CHAPTERS)),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_init_from_a_checkpoint_equals_the_final_export(tmp_path, name):
    fn, args, ranks, overrides = RUNS[name]
    out = tmp_path / "run"
    run_ranks(fn, str(out), *args, world_size=ranks, tmp_path=tmp_path / "r")
    final = _exported(out)
    ckpts = sorted((out / "checkpoints").glob("step*"))
    assert ckpts, "the run saved no checkpoint"
    if name == "zero3":
        assert any("zero_pp_rank_1" in p.name for p in ckpts[-1].iterdir())  # partitions of 2 ranks
    if name == "expert_parallel":
        assert (ckpts[-1] / "chapter_banks_rank1.safetensors").is_file()  # chapters sharded over 2 ranks
    cfg = make_cfg(tmp_path / "new", *overrides, f"training.init_from={out / 'checkpoints'}")
    torch.manual_seed(123)
    model = build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    init_from(model, cfg, 0)
    state = model.state_dict()
    assert set(final) <= set(state)
    for key, value in final.items():
        assert torch.equal(state[key], value.float()), key
    assert any(not torch.equal(fresh[k], state[k]) for k in final)  # it did load trained weights
    converted, _, _ = read_source(str(out / "checkpoints"))  # the converter reads the same weights
    assert all(torch.equal(converted[k], state[k]) for k in final)
