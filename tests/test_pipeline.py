"""Pipeline parallelism: 2 CPU stages against the plain model, shared banks, resume, plain state dicts."""
import json
import os

import pytest
import torch

from megamem.config import ConfigError

from conftest import ROOT, tiny_config
from dist_utils import run_ranks
from synthetic_data import SyntheticLoader, factory

PIPELINE = os.path.join(ROOT, "ds_configs", "pipeline.json")
ZERO0 = os.path.join(ROOT, "ds_configs", "zero0.json")
ZERO1 = os.path.join(ROOT, "ds_configs", "zero1.json")
SYN = ("memory.wo_init_zero=false", "training.mixed_precision=no", "training.max_length=16", "training.warmup_steps=2",
       "training.logging_steps=1", "training.eval_steps=1000", "training.save_steps=2", "memory.num_memory_tokens=16",
       "training.batch_size=2", "training.gradient_accumulation_steps=2", "training.max_steps=4",
       "training.max_grad_norm=0.05",  # clipping active: the norm must span both stages
       # memory in layers 1 and 3, one shared bank: with 2 stages each stage holds a memory layer
       "memory.memory_layer_placement=every_n", "memory.memory_layer_n=2", "memory.memory_sharing=shared")
STAGES = ("parallel.pipeline_stages=2",)
TIED = ("model.tie_embeddings=true",)  # the embedding is a TiedLayerSpec on both stages
CHAPTERS = ("memory.use_chapters=true", "memory.num_chapters=4", "memory.top_k_chapters=2", "memory.shared_router=true",
            "memory.routing_strategy_train=token", "memory.use_z_loss=true", "memory.use_load_balance_loss=true",
            "model.tie_embeddings=false", "parallel.pipeline_partition=uniform",
            "parallel.activation_checkpoint_interval=1", "training.optimizer=sgd", "training.memory_lr=2.0")  # SGD: clipping shows


def make_cfg(out, *extra):
    return tiny_config(*SYN, f"training.output_dir={out}", *extra)


def _fit(out, ds, extra, probe=False):
    """Train; report losses, eval, this rank's memory layers and banks, and (last stage) logits of a probe batch."""
    from megamem.parallel.pipeline import BlockPipe
    from megamem.train.trainer import Trainer

    calls = []  # block forwards with autograd on: 2 per micro-batch when activations are recomputed
    forward = BlockPipe.forward
    BlockPipe.forward = lambda self, inputs: (calls.append(torch.is_grad_enabled()), forward(self, inputs))[1]
    trainer = Trainer(make_cfg(out, *extra), ds, factory(61, 2, 16))
    result = {"initial_bank": trainer.model.banks[0].memory.detach().clone()}
    if not trainer.pipeline:
        result["initial_eval"] = trainer.evaluate()["eval_loss"]
    result.update(trainer.fit())
    model = trainer.model
    result["banks"] = [b.memory.detach().clone() for b in model.banks]
    result["grad_block_calls"] = sum(calls)
    if trainer.pipeline:
        from megamem.parallel.pipeline import BlockPipe, pipe_batch

        result["memory_layers"] = [f.layer for f in model.forward_funcs if isinstance(f, BlockPipe) and f.bank]
        result["stage"] = model.stage_id
        if probe:
            batch = next(iter(SyntheticLoader(61, 2, 16, split="eval")))
            out = trainer.engine.eval_batch(iter([pipe_batch(batch)]), return_logits=True, num_micro_batches=1)
            result["logits"] = out[1][0] if model.is_last_stage() else None
    return result


def _eval_from(out, ds, extra):
    """Evaluate a run started from training.init_from, before any step."""
    from megamem.train.trainer import Trainer

    return Trainer(make_cfg(out, *extra), ds, factory(61, 2, 16)).evaluate()["eval_loss"]


def _plain_and_pipeline(tmp_path, extra, pipe_ds=PIPELINE, pipe_extra=()):
    plain = run_ranks(_fit, str(tmp_path / "plain"), ZERO0, extra, world_size=1, tmp_path=tmp_path / "r1")[0]
    pipe = run_ranks(_fit, str(tmp_path / "pipe"), pipe_ds, (*extra, *pipe_extra), True, tmp_path=tmp_path / "r2")
    return plain, pipe


def _check_against_plain(plain, pipe, recompute):
    assert sorted(r["stage"] for r in pipe) == [0, 1]
    # 4 steps x 2 micro-batches x 2 blocks per stage, twice with activation checkpointing
    assert [r["grad_block_calls"] for r in pipe] == [16 * (2 if recompute else 1)] * 2
    assert all(r["memory_layers"] for r in pipe)  # memory blocks on both stages, reading the one shared bank
    for rank in pipe:
        # same weights, same batch: the same loss (router losses included) to 1e-5
        assert abs(rank["train_losses"][0] - plain["train_losses"][0]) <= 1e-5
        # later steps: gradients of shared weights are summed in another order (all-reduce between stages)
        assert torch.allclose(torch.tensor(rank["train_losses"]), torch.tensor(plain["train_losses"]), atol=1e-4, rtol=0)
        assert abs(rank["eval"]["eval_loss"] - plain["eval"]["eval_loss"]) <= 1e-4
        assert rank["eval"]["eval_tokens"] == plain["eval"]["eval_tokens"]
    assert plain["eval"]["eval_loss"] < plain["initial_eval"]  # it learned (the same eval batches before and after)
    # the shared bank is one bank: identical copies on both stages after the training steps, equal to the plain run's
    assert torch.equal(pipe[0]["banks"][0], pipe[1]["banks"][0])
    assert torch.allclose(pipe[0]["banks"][0], plain["banks"][0], atol=1e-4, rtol=0)
    assert not torch.allclose(pipe[0]["banks"][0], plain["initial_bank"], atol=1e-4, rtol=0)  # it did train


def test_pipeline_matches_plain_model_resumes_and_converts(tmp_path):
    from safetensors.torch import load_file

    from megamem.model import build_model
    from megamem.parallel.pipeline import plain_state_dict_from_checkpoint

    # ZeRO-1, the stages from the YAML
    plain, pipe = _plain_and_pipeline(tmp_path, TIED, ZERO1, STAGES)
    _check_against_plain(plain, pipe, recompute=False)

    # save at step 2 → resume → the same next losses as the unbroken run
    ckpt = tmp_path / "pipe" / "checkpoints"
    resumed = run_ranks(_fit, str(tmp_path / "pipe"), ZERO1,
                        (*TIED, *STAGES, f"training.resume_from_checkpoint={ckpt / 'step00000002'}"),
                        tmp_path=tmp_path / "r3")
    for rank in resumed:
        assert torch.allclose(torch.tensor(rank["train_losses"]), torch.tensor(pipe[0]["train_losses"][2:]), atol=1e-6,
                              rtol=0)

    # pipeline checkpoint → plain state dict → plain model: the pipeline's logits
    state = plain_state_dict_from_checkpoint(str(ckpt), "step00000004")
    cfg = make_cfg(tmp_path / "x", *TIED)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied: lm_head is tok_embeddings
    batch = next(iter(SyntheticLoader(61, 2, 16, split="eval")))
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"]).logits
    last = next(r for r in pipe if r["stage"] == 1)
    assert torch.allclose(logits, last["logits"], atol=1e-5, rtol=0)
    # the run's final export holds the same weights (gathered from both stages)
    exported = load_file(str(tmp_path / "pipe" / "final" / "model.safetensors"))
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)
    # ... and converts to a Hugging Face folder with the same logits
    from transformers import AutoModelForCausalLM

    from megamem.hf.convert import convert_to_hf

    convert_to_hf(str(ckpt), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.allclose(hf(batch["input_ids"]).logits, last["logits"], atol=1e-5, rtol=0)

    # another layout: a plain 1-rank run starts from the pipeline checkpoint's weights
    ev = run_ranks(_eval_from, str(tmp_path / "plain2"), ZERO0, (*TIED, f"training.init_from={ckpt / 'step00000004'}"),
                   world_size=1, tmp_path=tmp_path / "r4")[0]
    assert abs(ev - last["eval"]["eval_loss"]) <= 1e-5


def test_pipeline_chapters_router_losses_reach_the_loss(tmp_path):
    """Untied head, uniform partition, activation checkpointing, a router shared across stages."""
    plain, pipe = _plain_and_pipeline(tmp_path, CHAPTERS)
    _check_against_plain(plain, pipe, recompute=True)
    # each router loss arrives by name at the last stage, with the plain model's value
    first = [next(r for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if r["kind"] == "train")
             for run in ("plain", "pipe")]
    for name in ("lm_loss", "load_balance_loss", "z_loss"):
        assert abs(first[0][name] - first[1][name]) <= 1e-5, name
    assert first[1]["load_balance_loss"] > 1e-3 and first[1]["z_loss"] > 1e-5
    assert abs(first[1]["loss"] - first[1]["lm_loss"] - first[1]["load_balance_loss"] - first[1]["z_loss"]) < 1e-6
    # and back: a pipeline starts from the plain run's export (the shared router is stored once there)
    ev = run_ranks(_eval_from, str(tmp_path / "pipe2"), PIPELINE,
                   (*CHAPTERS, f"training.init_from={tmp_path / 'plain' / 'final'}"), tmp_path=tmp_path / "r3")
    assert all(abs(e - plain["eval"]["eval_loss"]) <= 1e-5 for e in ev)
    # growth across layouts: a pipeline one block deeper (training.init_from_new, zeros) is the plain model
    ev = run_ranks(_eval_from, str(tmp_path / "pipe3"), PIPELINE,
                   (*CHAPTERS, "model.num_layers=5", f"training.init_from={tmp_path / 'plain' / 'final'}",
                    "training.init_from_new=['blocks.4.*']", "training.init_from_new_init=zeros"), tmp_path=tmp_path / "r5")
    assert all(abs(e - plain["eval"]["eval_loss"]) <= 1e-5 for e in ev)


def test_pipeline_layout_is_resolved_and_refused_with_reasons(tmp_path):
    from megamem.train.ds_config import describe_layout, resolve_ds_config

    ds = resolve_ds_config(PIPELINE, tiny_config("training.batch_size=3", "training.gradient_accumulation_steps=4",
                                                 "parallel.activation_checkpoint_interval=2"), 4)
    assert ds["pipeline"] == {"stages": 2, "activation_checkpoint_interval": 2, "use_reentrant": False}
    assert ds["train_batch_size"] == 3 * 4 * 2  # 4 ranks = 2 stages x 2 data-parallel replicas
    assert "pipeline: 2 stages × 2 data-parallel replicas, 4 micro-batches per step" in describe_layout(ds, 4)
    # the YAML turns a pipeline on with any DeepSpeed JSON
    assert resolve_ds_config(ZERO0, tiny_config("parallel.pipeline_stages=2"), 2)["pipeline"]["stages"] == 2
    refused = [
        (PIPELINE, ("parallel.pipeline_stages=4",), 4, r"pipeline.stages = 2 conflicts with parallel.pipeline_stages = 4"),
        (PIPELINE, (), 3, r"pipeline.stages = 2 must divide the world size \(3 ranks\)"),
        (PIPELINE, ("training.gradient_checkpointing=true",), 2, r"use parallel.activation_checkpoint_interval"),
        (os.path.join(ROOT, "ds_configs", "zero2.json"), ("parallel.pipeline_stages=2",), 2,
         r"pipeline parallelism \(2 stages\) runs with ZeRO stage 0 or 1 only"),
    ]
    for path, overrides, world, message in refused:
        with pytest.raises(ConfigError, match=message):
            resolve_ds_config(path, tiny_config(*overrides), world)
    bad = tmp_path / "bad.json"
    bad.write_text('{"pipeline": {"stages": 0}}')
    with pytest.raises(ConfigError, match=r"bad.json: pipeline.stages must be a positive integer or \"auto\", got 0"):
        resolve_ds_config(str(bad), tiny_config(), 2)


@pytest.mark.parametrize("override,message", [
    ("parallel.pipeline_stages=0", r"parallel.pipeline_stages must be > 0, got 0"),
    ("parallel.pipeline_stages=5", r"parallel.pipeline_stages \(5\) must be at most model.num_layers \(4\)"),
    ("parallel.activation_checkpoint_interval=-1", r"parallel.activation_checkpoint_interval must be >= 0"),
    ("parallel.pipeline_partition=type", r"pipeline_partition"),
])
def test_bad_pipeline_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


def test_init_from_bad_input(tmp_path):
    from megamem.model import build_model
    from megamem.folders import export_model
    from megamem.train.init_from import init_from

    with pytest.raises(ConfigError, match=r"training.init_from: .*nope does not exist \(expected an export folder"):
        init_from(build_model(tiny_config()), tiny_config(f"training.init_from={tmp_path / 'nope'}"), 0)
    small = tiny_config()
    export_model(build_model(small).state_dict(), small, None, str(tmp_path / "small"), 0)
    other = tiny_config("model.hidden_dim=64", f"training.init_from={tmp_path / 'small'}")
    with pytest.raises(ConfigError, match=r"training.init_from: .*small does not fit this model config: tok_embeddings.weight has shape "
                       r"\[61, 32\] there, \[61, 64\] here \(and \d+ more\)$"):
        init_from(build_model(other), other, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"training.init_from: .*empty: neither an export folder \(no model.safetensors\), nor a "
                       r"checkpoint \(no COMPLETE marker\), nor a checkpoints folder \(no 'latest' file\)"):
        init_from(build_model(small), tiny_config(f"training.init_from={empty}"), 0)
