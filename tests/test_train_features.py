"""Training features without a test before: checkpoint rotation and the best marker, early stopping,
num_epochs, save_precision, and top-p sampling — each against an independent reference (the run's own
metrics.jsonl, a count by hand, the fp32 export rounded, a brute-force nucleus)."""
import json
import math
import os

import torch

from dist_utils import run_ranks
from synthetic_data import SyntheticLoader
from test_train import ZERO, make_cfg


def _run(out, extra, epochs_of=None):
    from megamem.train.trainer import Trainer

    def loaders(split, rank, world):
        loader = SyntheticLoader(61, 2, 16, rank, world, split)
        if epochs_of is not None and split == "train":
            loader.num_batches = epochs_of  # a source of known length (what num_epochs needs)
        return loader

    trainer = Trainer(make_cfg(out, "training.batch_size=2", *extra), ZERO[0], loaders)
    result = trainer.fit()
    result["total_steps"] = trainer.total_steps
    return result


def _records(out, kind):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == kind]


def test_rotation_keeps_the_newest_and_the_best_and_early_stopping_stops(tmp_path):
    out = str(tmp_path / "rot")
    run_ranks(_run, out, ("training.max_steps=6", "training.save_steps=1", "training.eval_steps=1",
                          "training.save_total_limit=2", "training.save_best_model=true",
                          "training.learning_rate=0.05", "training.memory_lr=0.05"), world_size=1,
              tmp_path=tmp_path / "r1")
    evals = _records(out, "eval")
    best_step = min(evals, key=lambda r: r["eval_loss"])["step"]
    ckpt = tmp_path / "rot" / "checkpoints"
    assert (ckpt / "best").read_text() == f"step{best_step:08d}"
    kept = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert kept == sorted({"step00000005", "step00000006", f"step{best_step:08d}"})  # the rest were deleted
    assert all((ckpt / name / "COMPLETE").is_file() for name in kept)
    # early stopping: an improvement must beat the best by 10 nats, so the second evaluation already fails
    stop = str(tmp_path / "stop")
    result = run_ranks(_run, stop, ("training.max_steps=20", "training.eval_steps=2", "training.early_stopping=true",
                                    "training.early_stopping_patience=2", "training.early_stopping_threshold=10"),
                       world_size=1, tmp_path=tmp_path / "r2")[0]
    assert result["steps"] == 6  # evals at 2 (improves on inf), 4 and 6 (two without improvement) → stop
    assert [r["step"] for r in _records(stop, "eval")] == [2, 4, 6]


def test_num_epochs_sets_the_steps_from_the_data(tmp_path):
    result = run_ranks(_run, str(tmp_path / "ep"), ("training.num_epochs=3", "training.gradient_accumulation_steps=2",
                                                     "training.max_steps=1000"),
                       7, world_size=1, tmp_path=tmp_path / "r")[0]
    assert result["total_steps"] == math.ceil(7 * 3 / 2) == result["steps"] == 11  # 7 batches × 3 epochs / accum 2
    assert [r["step"] for r in _records(str(tmp_path / "ep"), "train")] == list(range(1, 12))  # max_steps yields


def test_save_precision_rounds_the_fp32_export(tmp_path):
    from safetensors.torch import load_file

    for precision in ("fp32", "bf16"):
        run_ranks(_run, str(tmp_path / precision), ("training.max_steps=2", f"training.save_precision={precision}"),
                  world_size=1, tmp_path=tmp_path / f"r{precision}")
    full = load_file(str(tmp_path / "fp32" / "final" / "model.safetensors"))
    half = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert full.keys() == half.keys()
    for name, t in full.items():
        assert half[name].dtype == (torch.bfloat16 if t.is_floating_point() else t.dtype), name
        assert torch.equal(half[name], t.to(half[name].dtype)), name  # same training, rounded once at export


def test_top_p_samples_exactly_the_nucleus():
    from megamem.model.sampling import select_next_token

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 5.0, 0.0]])
    top_p = 0.8
    probs = logits.softmax(-1)
    nucleus = []
    for row in probs:  # brute force: the fewest most-probable tokens whose mass reaches top_p
        order = sorted(range(len(row)), key=lambda i: -row[i].item())
        taken, mass = [], 0.0
        for i in order:
            taken.append(i)
            mass += row[i].item()
            if mass >= top_p:
                break
        nucleus.append(set(taken))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([select_next_token(logits, temperature=1.0, top_p=top_p, generator=gen) for _ in range(2000)])
    for b in range(2):
        seen = set(draws[:, b].tolist())
        assert seen == nucleus[b], (seen, nucleus[b])
        inside = probs[b, sorted(nucleus[b])] / probs[b, sorted(nucleus[b])].sum()  # renormalised nucleus
        freq = torch.tensor([(draws[:, b] == i).float().mean().item() for i in sorted(nucleus[b])])
        assert (freq - inside).abs().max() < 0.04  # 2000 draws: standard error ≤ 0.011
