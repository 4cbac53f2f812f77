"""A catalogue of malformed inputs to megamem's command-line tools: configs, CLI flags, DeepSpeed JSON,
data files, tokenizers, checkpoints and exports. Each must end with exit code 2 and exactly one line
on stderr, starting with `error:` and naming the culprit — no traceback, and nothing new left on disk
(an output folder, a partial shard, a half-written export). A code-running pickle is never executed.

The scripts run in this process (their `main` under `run_cli`, sys.argv set), so an unexpected
exception fails the test with its traceback instead of being hidden in a subprocess.
"""
import importlib.util
import json
import os
import pickle
import sys

import pytest
import torch

from conftest import ROOT, tiny_config

TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
SCRIPTS = {"train": "scripts/train.py", "eval": "scripts/eval.py", "inference": "scripts/inference.py",
           "convert": "tools/convert_to_hf.py", "preprocess": "tools/preprocess_data.py",
           "progressive": "tools/progressive.py"}
_modules = {}


def script(name):
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"megamem_cli_{name}", os.path.join(ROOT, SCRIPTS[name]))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


class Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs, made once: an export, a ZeRO-0 checkpoint, a tokenizer, and damaged copies."""
    from megamem.model import build_model
    from megamem.folders import export_model

    d = tmp_path_factory.mktemp("inputs")
    w = lambda name, text, mode="w": (open(d / name, mode).write(text), str(d / name))[1]  # noqa: E731
    f = {"dir": d, "marker": str(d / "PICKLE_RAN")}
    cfg = tiny_config()
    model = build_model(cfg)
    export_model(model.state_dict(), cfg, None, str(d / "final"), 1)
    f["final"] = str(d / "final")
    bidir = tiny_config("model.attention_mode=bidirectional", "training.time_step_masking=true",
                        "training.mask_token_id=3")
    export_model(build_model(bidir).state_dict(), bidir, None, str(d / "bidir"), 1)
    f["bidir"] = str(d / "bidir")
    for name, damage in (("trunc", "truncate"), ("pickled", "pickle")):
        os.makedirs(d / name)
        for item in os.listdir(d / "final"):
            os.link(d / "final" / item, d / name / item) if item != "model.safetensors" else None
        weights = open(d / "final" / "model.safetensors", "rb").read()
        blob = weights[:len(weights) // 2] if damage == "truncate" else pickle.dumps(Evil(f["marker"]))
        open(d / name / "model.safetensors", "wb").write(blob)
        f[name] = str(d / name)
    step = d / "ckpt" / "step00000001"  # a ZeRO-0 checkpoint whose model states are a code-running pickle
    os.makedirs(step)
    (step / "COMPLETE").write_text("1\n")
    (step / "config.yaml").write_text(open(d / "final" / "config.yaml").read())
    (d / "ckpt" / "latest").write_text("step00000001")
    torch.save({"module": Evil(f["marker"])}, str(step / "mp_rank_00_model_states.pt"))
    f["evil_ckpt"] = str(d / "ckpt")
    tstep = d / "tckpt" / "step00000001"  # … and one whose model states are truncated
    os.makedirs(tstep)
    for name in ("COMPLETE", "config.yaml"):
        (tstep / name).write_text((step / name).read_text())
    (d / "tckpt" / "latest").write_text("step00000001")
    torch.save({"module": model.state_dict()}, str(tstep / "whole.pt"))
    data = (tstep / "whole.pt").read_bytes()
    (tstep / "mp_rank_00_model_states.pt").write_bytes(data[:len(data) // 3])
    os.remove(tstep / "whole.pt")
    f["trunc_ckpt"] = str(d / "tckpt")
    os.makedirs(d / "old_run")
    (d / "old_run" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    f["old_run"] = str(d / "old_run")
    os.makedirs(d / "not_empty")
    (d / "not_empty" / "keep.txt").write_text("x")
    f["yaml"] = {
        "empty": w("empty.yaml", ""),
        "dup": w("dup.yaml", "model:\n  hidden_dim: 64\n  num_layers: 2\n  hidden_dim: 128\n"),
        "syntax": w("syntax.yaml", "model:\n  hidden_dim: [64\n"),
        "list": w("list.yaml", "- model\n- memory\n"),
        "section": w("section.yaml", "modle:\n  hidden_dim: 64\n"),
        "notmap": w("notmap.yaml", "model: 64\n"),
        "alias": w("alias.yaml", "model:\n  use_rope: false\n  pos_encoding: {type: rope}\n"),
        "nan": w("nan.yaml", "training:\n  memory_lr: .nan\n"),
        "rope_base": w("rope_base.yaml", "model:\n  rope_theta: 500.0\n  pos_encoding:\n    rope_base: 1000.0\n"),
        "binary": w("binary.yaml", bytes(range(128, 256)), "wb"),
    }
    f["ds"] = {
        "notjson": w("notjson.json", "{oops"),
        "list": w("list.json", "[1, 2]"),
        "stage4": w("stage4.json", json.dumps({"zero_optimization": {"stage": 4}})),
        "stagestr": w("stagestr.json", json.dumps({"zero_optimization": {"stage": "three"}})),
        "zeronotobj": w("zeronotobj.json", json.dumps({"zero_optimization": 3})),
        "optimizer": w("optimizer.json", json.dumps({"optimizer": {"type": "Adam"}})),
        "batch": w("batch.json", json.dumps({"train_micro_batch_size_per_gpu": 3})),
    }
    f["data"] = {
        "corrupt": w("corrupt.jsonl", '{"text": "one"}\n{"text": "two"}\n{"text": broken\n{"text": "four"}\n'),
        "nofield": w("nofield.jsonl", '{"text": "one"}\n{"body": "two"}\n'),
        "nonstr": w("nonstr.jsonl", '{"text": "one"}\n{"text": 5}\n'),
        "array": w("array.jsonl", '{"text": "one"}\n[1, 2]\n'),
        "utf8": w("utf8.txt", b"fine\n\xff\xfe broken\n", "wb"),
    }
    from data_utils import tokenizer_dir

    tok = tokenizer_dir()  # a small SentencePiece tokenizer of our own (no hub), outside the watched folder
    f["tok"] = tok
    return f


def Y(f, k):
    return f["yaml"][k]


def DS(f, k):
    return f["ds"][k]


def D(f, k):
    return f["data"][k]


DRY = ("--config", TINY, "--dry-run")
MLA_DRY = ("--config", os.path.join(ROOT, "configs", "mla_small.yaml"), "--dry-run")
BID = (*DRY, "--model.attention_mode", "bidirectional", "--training.time_step_masking", "true")


def PRE(f, data, out, tok=None):
    """tools/preprocess_data.py arguments: one input, the test tokenizer (or `tok`), a fresh --out."""
    return ["--input", data, "--tokenizer", tok or f["tok"], "--out", str(f["dir"] / out), "--workers", "1"]


def TOK(f, tokenizer, *extra):
    """scripts/train.py arguments of a real run (not a dry run) with the given tokenizer."""
    return ["--config", TINY, *extra, "--model.tokenizer_name", tokenizer, "--training.output_dir",
            str(f["dir"] / "run")]
CASES = {
    # ---- configs
    "config file missing": ("train", lambda f: ["--config", "nope.yaml", "--dry-run"], "config file not found: nope.yaml"),
    "config empty": ("train", lambda f: ["--config", Y(f, "empty"), "--dry-run"], "the file is empty"),
    "config duplicate key": ("train", lambda f: ["--config", Y(f, "dup"), "--dry-run"],
                             "line 4: key 'hidden_dim' is given twice in one mapping (first on line 2)"),
    "config not YAML": ("train", lambda f: ["--config", Y(f, "syntax"), "--dry-run"], "not valid YAML"),
    "config top level a list": ("train", lambda f: ["--config", Y(f, "list"), "--dry-run"],
                                "the top level must be a mapping"),
    "config unknown section": ("train", lambda f: ["--config", Y(f, "section"), "--dry-run"],
                               "unknown section 'modle' (did you mean 'model'?)"),
    "config section not a mapping": ("train", lambda f: ["--config", Y(f, "notmap"), "--dry-run"],
                                     "section 'model' must be a mapping of keys"),
    "config nan learning rate": ("train", lambda f: ["--config", Y(f, "nan"), "--dry-run"],
                                 "training.memory_lr = nan is not a finite number"),
    "config not UTF-8": ("train", lambda f: ["--config", Y(f, "binary"), "--dry-run"], "not a text file (not UTF-8)"),
    "override inf max_grad_norm": ("train", lambda f: [*DRY, "--training.max_grad_norm", "inf"],
                                   "training.max_grad_norm = 'inf' is not a finite number"),
    "override unknown key": ("train", lambda f: [*DRY, "--memory.num_memory_token", "5"],
                             "unknown key 'memory.num_memory_token' (did you mean 'num_memory_tokens'?)"),
    "override wrong type": ("train", lambda f: [*DRY, "--model.num_layers", "four"],
                            "model.num_layers = 'four' has the wrong type: expected integer"),
    "override without value": ("train", lambda f: [*DRY, "--model.num_layers"], "needs a value"),
    "override unknown section": ("train", lambda f: [*DRY, "--modl.num_layers", "2"], "unknown section 'modl'"),
    "override not an override": ("train", lambda f: [*DRY, "stray"], "unrecognised argument 'stray'"),
    "memory_top_k beyond the bank": ("train", lambda f: [*DRY, "--memory.memory_top_k", "100000"],
                                     "memory.memory_top_k (100000) exceeds the bank's rows"),
    "memory_top_k zero": ("train", lambda f: [*DRY, "--memory.memory_top_k", "0"],
                          "memory.memory_top_k must be a positive number of rows"),
    "qk temperature without qk norm": ("train", lambda f: [*DRY, "--memory.memory_qk_norm", "false",
                                                          "--memory.memory_qk_temperature", "10"],
                                       "memory.memory_qk_temperature is the initial temperature of memory_qk_norm"),
    "qk temperature not positive": ("train", lambda f: [*DRY, "--memory.memory_qk_norm", "true",
                                                        "--memory.memory_qk_temperature", "-1"],
                                    "memory.memory_qk_temperature must be > 0"),
    "sharp reads with chapters": ("train", lambda f: [*DRY, "--memory.use_chapters", "true", "--memory.memory_top_k",
                                                      "4"], "memory.memory_top_k / memory_qk_norm read a dense bank"),
    "every_n beyond the layers": ("train", lambda f: [*DRY, "--memory.memory_layer_placement", "every_n",
                                                      "--memory.memory_layer_n", "9"],
                                  "memory.memory_layer_n = 9 selects no layer of 4"),
    "pos_encoding key for another type": ("train", lambda f: [*DRY, "--model.pos_encoding.hybrid_K", "100"],
                                          "model.pos_encoding.hybrid_K applies to pos_encoding.type hybrid only"),
    "pos_encoding unknown irrational": ("train", lambda f: [*DRY, "--model.pos_encoding.type", "pi_spiral",
                                                            "--model.pos_encoding.irrational", "tau"],
                                        "model.pos_encoding.irrational"),
    "ntk factor below 1": ("train", lambda f: [*DRY, "--model.pos_encoding.type", "rope_ntk",
                                               "--model.pos_encoding.ntk_factor", "0.5"],
                           "model.pos_encoding.ntk_factor must be >= 1, got 0.5"),
    "negative transition width": ("train", lambda f: [*DRY, "--model.pos_encoding.type", "hybrid",
                                                      "--model.pos_encoding.transition_width", "-1"],
                                  "model.pos_encoding.transition_width must be >= 0, got -1"),
    "rope_base contradicts rope_theta": ("train", lambda f: ["--config", Y(f, "rope_base"), "--dry-run"],
                                         "model.pos_encoding.rope_base = 1000.0 contradicts model.rope_theta = 500.0"),
    "alibi on an adapter run": ("train", lambda f: [*DRY, "--model.base_model_name", "some/model",
                                                    "--model.pos_encoding.type", "alibi"],
                                "model.pos_encoding.type alibi applies to from-scratch models"),
    "hybrid on an adapter run without memory": ("train", lambda f: [*DRY, "--model.base_model_name", "some/model",
                                                                    "--model.pos_encoding.type", "hybrid",
                                                                    "--memory.use_memory_adapter", "false",
                                                                    "--memory.use_lora", "true"],
                                                "model.pos_encoding.type hybrid on an adapter run (a gated hybrid) "
                                                "trains with the memory adapter"),
    "attractor on an adapter run without memory": ("train", lambda f: [*DRY, "--model.base_model_name", "some/model",
                                                                       "--model.attractor.use_attractor", "true",
                                                                       "--memory.use_memory_adapter", "false",
                                                                       "--memory.use_lora", "true"],
                                                   "model.attractor.use_attractor on an adapter run trains with the "
                                                   "memory adapter"),
    "attractor alpha out of range": ("train", lambda f: [*DRY, "--model.attractor.use_attractor", "true",
                                                         "--model.attractor.alpha_value", "1.5"],
                                     "model.attractor.alpha_value must be in (0, 1), got 1.5"),
    "attractor unknown policy": ("train", lambda f: [*DRY, "--model.attractor.alpha_policy", "cosine"],
                                 "model.attractor.alpha_policy"),
    "attractor layers out of range": ("train", lambda f: [*DRY, "--model.attractor.use_attractor", "true",
                                                          "--model.attractor.inject_layers", "[0, 7]"],
                                      "model.attractor.inject_layers must list distinct layers in [0, 4), got [0, 7]"),
    "attractor N_inject beyond the layers": ("train", lambda f: [*DRY, "--model.attractor.use_attractor", "true",
                                                                 "--model.attractor.inject_layers", "last_N",
                                                                 "--model.attractor.N_inject", "9"],
                                             "model.attractor.N_inject must be in [1, 4]"),
    "window size zero": ("train", lambda f: [*DRY, "--model.window_size", "0"], "model.window_size must be > 0, got 0"),
    "trainable pattern matching nothing": ("train", lambda f: [*DRY, "--training.trainable", "[bnks.*]"],
                                           "training.trainable: pattern 'bnks.*' matches no parameter; names start with"),
    "trainable and frozen together": ("train", lambda f: [*DRY, "--training.trainable", "[banks.*]",
                                                          "--training.frozen", "[norm.*]"],
                                      "training.trainable and training.frozen both select parameters"),
    "from-scratch LoRA on absent modules": ("train", lambda f: [*DRY, "--memory.use_lora", "true",
                                                                "--memory.use_both_memory_and_lora", "true"],
                                            "memory.lora_targets ['q_proj', 'v_proj'] name no module"),
    "no memory adapter from scratch": ("train", lambda f: [*DRY, "--memory.use_memory_adapter", "false"],
                                       "use_memory_adapter: false applies to adapter runs"),
    "unknown attention type": ("train", lambda f: [*DRY, "--model.attention_type", "linear"],
                               "model.attention_type: 'linear' is not available; valid: mha, mla, gqa, standard"),
    "MLA odd rope width": ("train", lambda f: [*MLA_DRY, "--model.mla_config.qk_rope_head_dim", "7"],
                           "model.mla_config.qk_rope_head_dim must be even (RoPE rotates pairs), got 7"),
    "MLA empty latent": ("train", lambda f: [*MLA_DRY, "--model.mla_config.kv_lora_rank", "0"],
                         "model.mla_config.kv_lora_rank must be > 0, got 0"),
    "MLA negative query rank": ("train", lambda f: [*MLA_DRY, "--model.mla_config.q_lora_rank", "-3"],
                                "model.mla_config.q_lora_rank must be >= 0 (0 or null = no low-rank query), got -3"),
    "MLA with kv heads": ("train", lambda f: [*MLA_DRY, "--model.num_kv_heads", "2"],
                          "model.num_kv_heads (2) is for mha; attention_type mla shares one latent across all heads"),
    "mla_config without MLA": ("train", lambda f: [*MLA_DRY, "--model.attention_type", "mha"],
                               "model.mla_config is read only with model.attention_type: mla (it is 'mha')"),
    "unknown position type": ("train", lambda f: [*DRY, "--model.pos_encoding.type", "sinusoid"],
                              "model.pos_encoding.type: 'sinusoid' is not available; valid: alibi, hybrid, learned, none, pi_spiral, rope, rope_ntk"),
    "unknown MLP type": ("train", lambda f: [*DRY, "--model.mlp_type", "relu"],
                         "model.mlp_type: 'relu' is not available; valid: gelu, gelu_tanh, peer, swiglu"),
    "PEER sub-key sets do not multiply to the experts": ("train", lambda f: [*DRY, "--model.use_peer", "true",
                                                                             "--model.peer_config.product_key_dim", "[16, 16]"],
                                                         "model.peer_config.product_key_dim [16, 16]: the product 256 must "
                                                         "equal model.peer_config.num_experts (1024)"),
    "PEER one sub-key set": ("train", lambda f: [*DRY, "--model.use_peer", "true", "--model.peer_config.product_key_dim",
                                                 "[1024]"], "model.peer_config.product_key_dim [1024] must list at least 2"),
    "PEER k above the experts": ("train", lambda f: [*DRY, "--model.use_peer", "true", "--model.peer_config.num_experts",
                                                     "16", "--model.peer_config.product_key_dim", "[4, 4]",
                                                     "--model.peer_config.num_experts_per_tok", "17"],
                                 "model.peer_config.num_experts_per_tok (17) must be <= num_experts (16)"),
    "PEER query not split evenly": ("train", lambda f: [*DRY, "--model.use_peer", "true", "--model.peer_config.num_experts",
                                                        "64", "--model.peer_config.product_key_dim", "[4, 4, 4]"],
                                    "model.peer_config.query_dim (64) must be divisible by the 3 sub-key sets"),
    "PEER start layer and placement both": ("train", lambda f: [*DRY, "--model.use_peer", "true",
                                                                "--model.peer_start_layer", "1",
                                                                "--model.peer_layer_placement", "all"],
                                            "model.peer_start_layer and model.peer_layer_placement both place PEER"),
    "PEER start layer beyond the layers": ("train", lambda f: [*DRY, "--model.use_peer", "true",
                                                               "--model.peer_start_layer", "4"],
                                           "model.peer_start_layer = 4 must be in [0, 4)"),
    "PEER as the model-wide MLP": ("train", lambda f: [*DRY, "--model.mlp_type", "peer"],
                                   "model.mlp_type: peer is chosen per layer: set model.use_peer: true"),
    "PEER unknown placement": ("train", lambda f: [*DRY, "--model.use_peer", "true", "--model.peer_layer_placement",
                                                   "centre"], "model.peer_layer_placement"),
    "nested override into a value": ("train", lambda f: [*DRY, "--model.num_layers.type", "2"],
                                     "model.num_layers is not a section of keys"),
    "alias contradicts its key": ("train", lambda f: ["--config", Y(f, "alias"), "--dry-run"],
                                  "model.use_rope = false (an alias: model.pos_encoding.type = learned) contradicts "
                                  "model.pos_encoding.type = rope"),
    "heads do not divide width": ("train", lambda f: [*DRY, "--model.num_heads", "3"],
                                  "model.hidden_dim (128) must be divisible by model.num_heads (3)"),
    "memory layer index out of range": ("train", lambda f: [*DRY, "--memory.memory_layer_placement", "custom",
                                                            "--memory.memory_layer_indices", "[9]"],
                                        "memory.memory_layer_indices [9] out of range"),
    "top-k above the chapters": ("train", lambda f: [*DRY, "--memory.use_chapters", "true", "--memory.num_chapters",
                                                     "4", "--memory.top_k_chapters", "5"],
                                 "memory.top_k_chapters (5) must be <= memory.num_chapters (4)"),
    "fp8 without CUDA 8.9": ("train", lambda f: [*DRY, "--training.mixed_precision", "fp8"],
                             "needs CUDA compute capability ≥ 8.9 (found: cpu)"),
    "negative warmup": ("train", lambda f: [*DRY, "--training.warmup_steps", "-1"], "training.warmup_steps must be >= 0"),
    "retired distributed_strategy": ("train", lambda f: [*DRY, "--training.distributed_strategy", "fsdp"],
                                     "'fsdp' is not supported"),
    "two data sources": ("train", lambda f: [*DRY, "--training.dataset_name", "data/corpus/kjv/train.jsonl"],
                         "data.datasets and training.dataset_name each name training data; keep one"),
    "split ignored by data.datasets": ("train", lambda f: [*DRY, "--training.eval_split", "test"],
                                       "training.eval_split = 'test' would be ignored"),
    "ddp with a sharding JSON": ("train", lambda f: [*DRY, "--training.distributed_strategy", "ddp", "--deepspeed",
                                                     os.path.join(ROOT, "ds_configs", "zero3.json")],
                                 "distributed_strategy: ddp means whole replicas per rank (ZeRO-0)"),
    # ---- progressive training (docs/progressive.md)
    "progressive blocks miss the layers": ("train", lambda f: [*DRY, "--training.mode", "blockwise",
                                                               "--training.block_size", "3", "--training.total_blocks",
                                                               "2"],
                                           "training.total_blocks * training.block_size = 2 * 3 must equal "
                                           "model.num_layers (4)"),
    "layerwise with larger blocks": ("train", lambda f: [*DRY, "--training.mode", "layerwise", "--training.block_size",
                                                         "2"], "layerwise trains one layer per phase (block_size 1)"),
    "schedule key with mode full": ("train", lambda f: [*DRY, "--training.total_blocks", "2"],
                                    "training.total_blocks is set but training.mode is full"),
    "progressive with a trainable glob": ("train", lambda f: [*DRY, "--training.mode", "layerwise",
                                                              "--training.trainable", "[banks.*]"],
                                          "training.trainable: with training.mode: layerwise the phase decides"),
    "progressive config given to train.py": ("train", lambda f: ["--config", TINY, "--training.mode", "layerwise"],
                                             "training.mode: layerwise trains one phase per run: run python "
                                             "tools/progressive.py"),
    "fp8 trunk": ("train", lambda f: [*DRY, "--training.quantization_enabled", "true", "--training.quantization_type",
                                      "fp8"], "training.quantization_type: fp8 is not a trunk storage megamem has"),
    "4-bit trunk on CPU": ("train", lambda f: [*DRY, "--training.mode", "fused", "--training.block_size", "2",
                                               "--training.total_blocks", "2", "--training.qlora_enabled", "true",
                                               "--training.quantization_enabled", "true",
                                               "--training.quantization_type", "nf4"],
                           "means LoRA on a full-precision frozen trunk: set training.quantization_enabled: false"),
    "LoRA on the trunk of a full run": ("train", lambda f: [*DRY, "--training.qlora_enabled", "true"],
                                       "training.qlora_enabled puts LoRA on a progressive phase's frozen trunk"),
    "trunk LoRA key without LoRA": ("train", lambda f: [*DRY, "--training.qlora_rank", "16"],
                                    "training.qlora_rank is read only with LoRA on the trunk"),
    # ---- the masked-denoising objective and bidirectional attention (docs/progressive.md#masked-denoising)
    "masking with causal attention": ("train", lambda f: [*DRY, "--training.time_step_masking", "true"],
                                      "training.time_step_masking predicts each masked token from both sides: set "
                                      "model.attention_mode: bidirectional"),
    "bidirectional without masking": ("train", lambda f: [*DRY, "--model.attention_mode", "bidirectional"],
                                      "model.attention_mode: bidirectional lets every position see the next token"),
    "bidirectional with a window": ("train", lambda f: [*BID, "--model.window_size", "8"],
                                    "model.window_size: sliding-window attention is causal"),
    "bidirectional with alibi": ("train", lambda f: [*BID, "--model.pos_encoding.type", "alibi"],
                                 "model.pos_encoding.type: alibi biases keys by i − j before the query (causal)"),
    "bidirectional with the attractor": ("train", lambda f: [*BID, "--model.attractor.use_attractor", "true"],
                                         "model.attractor.use_attractor: the attractor state reads the tokens before"),
    "bidirectional with long-context eval": ("train", lambda f: [*BID, "--training.eval_long_context", "true",
                                                                 "--evaluation.benchmarks", "[niah]"],
                                             "training.eval_long_context (NIAH/RULER generate with a KV cache) needs "
                                             "a causal model"),
    "masking keys without masking": ("train", lambda f: [*DRY, "--training.num_time_steps", "4"],
                                     "training.num_time_steps configure the masked-denoising objective; set "
                                     "training.time_step_masking: true"),
    "mask fractions and a schedule": ("train", lambda f: [*BID, "--training.time_step_mask_fractions", "[0.2, 0.5]",
                                                          "--training.mask_schedule_type", "cosine"],
                                      "training.time_step_mask_fractions and training.mask_schedule_type both give"),
    "mask fractions of another length": ("train", lambda f: [*BID, "--training.time_step_mask_fractions", "[0.2, 0.5]",
                                                             "--training.num_time_steps", "3"],
                                         "training.num_time_steps (3) must equal the length of"),
    "mask fraction above 1": ("train", lambda f: [*BID, "--training.time_step_mask_fractions", "[0.5, 1.5]"],
                              "training.time_step_mask_fractions [1.5]: each fraction must be in (0, 1]"),
    "mask fraction masking nothing": ("train", lambda f: [*BID, "--training.time_step_mask_fractions", "[0.001]"],
                                      "mask fraction 0.001 masks ⌊128·f⌋ = 0 tokens of a training.max_length row"),
    "min mask fraction above max": ("train", lambda f: [*BID, "--training.min_mask_fraction", "0.8",
                                                        "--training.max_mask_fraction", "0.5"],
                                    "training.min_mask_fraction (0.8) must be <= training.max_mask_fraction (0.5)"),
    "block time steps with mode full": ("train", lambda f: [*BID, "--training.time_step_selection", "block"],
                                        "training.time_step_selection: block picks t from the phase's block"),
    "mask token outside the vocabulary": ("train", lambda f: [*BID, "--training.mask_token_id", "4096"],
                                          "training.mask_token_id = 4096 is outside the vocabulary [0, 4096)"),
    "mask token is the pad token": ("train", lambda f: [*BID, "--training.mask_token_id", "0"],
                                    "training.mask_token_id = 0 is model.pad_token_id"),
    "masking on a pipeline": ("train", lambda f: [*BID, "--deepspeed", os.path.join(ROOT, "ds_configs",
                                                                                    "pipeline.json")],
                              "training.time_step_masking is not wired for pipeline stages"),
    "check: no mask token": ("train", lambda f: TOK(f, f["tok"], *BID[3:], "--check"),
                             "training.time_step_masking needs a mask token: set training.mask_token_id"),
    "inference on a bidirectional model": ("inference", lambda f: ["--model", f["bidir"], "--prompt", "hi"],
                                           "model.attention_mode: bidirectional: inference and evaluation "
                                           "(generation, causal perplexity) needs a causal model"),
    "eval on a bidirectional model": ("eval", lambda f: ["--model", f["bidir"]], "needs a causal model"),
    "convert a bidirectional model": ("convert", lambda f: ["--checkpoint", f["bidir"], "--output",
                                                            str(f["dir"] / "o6")],
                                      "a Hugging Face causal LM folder (AutoModelForCausalLM) needs a causal model"),
    "phase tool on a full config": ("progressive", lambda f: ["--config", TINY],
                                    "training.mode is full: nothing to run in phases"),
    # ---- CLI flags
    "train without --config": ("train", lambda f: ["--dry-run"], "the following arguments are required: --config"),
    "eval without --model": ("eval", lambda f: [], "the following arguments are required: --model"),
    "eval zero batches": ("eval", lambda f: ["--model", f["final"], "--max-batches", "0"],
                          "--max-batches 0: evaluate at least 1 batch"),
    "inference negative length": ("inference", lambda f: ["--model", f["final"], "--prompt", "hi",
                                                          "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
    "convert bad dtype": ("convert", lambda f: ["--checkpoint", f["final"], "--output", str(f["dir"] / "o1"),
                                                "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    "convert missing input": ("convert", lambda f: ["--checkpoint", str(f["dir"] / "none"), "--output",
                                                    str(f["dir"] / "o2")], "does not exist"),
    "convert onto a non-empty folder": ("convert", lambda f: ["--checkpoint", f["final"], "--output",
                                                              str(f["dir"] / "not_empty")], "megamem did not write"),
    # ---- DeepSpeed JSON
    "deepspeed file missing": ("train", lambda f: [*DRY, "--deepspeed", "nope.json"], "DeepSpeed config not found"),
    "deepspeed not JSON": ("train", lambda f: [*DRY, "--deepspeed", DS(f, "notjson")], "not valid JSON"),
    "deepspeed top level a list": ("train", lambda f: [*DRY, "--deepspeed", DS(f, "list")],
                                   "the top level must be a JSON object"),
    "deepspeed stage 4": ("train", lambda f: [*DRY, "--deepspeed", DS(f, "stage4")],
                          "zero_optimization.stage = 4; valid: 0, 1, 2, 3"),
    "deepspeed stage a word": ("train", lambda f: [*DRY, "--deepspeed", DS(f, "stagestr")],
                               "zero_optimization.stage = 'three'"),
    "deepspeed zero section a number": ("train", lambda f: [*DRY, "--deepspeed", DS(f, "zeronotobj")],
                                        "zero_optimization must be a JSON object"),
    "deepspeed own optimizer": ("train", lambda f: [*DRY, "--deepspeed", DS(f, "optimizer")],
                                "remove the 'optimizer' section"),
    "deepspeed batch conflicts with YAML": ("train", lambda f: [*DRY, "--deepspeed", DS(f, "batch")],
                                            "train_micro_batch_size_per_gpu = 3 conflicts with training.batch_size"),
    # ---- data files (tools/preprocess_data.py)
    "data corrupt record": ("preprocess", lambda f: PRE(f, D(f, "corrupt"), "s1"), "corrupt.jsonl line 3: not valid JSON"),
    "data missing field": ("preprocess", lambda f: PRE(f, D(f, "nofield"), "s2"),
                           "nofield.jsonl record 2 has no field 'text'"),
    "data non-string field": ("preprocess", lambda f: PRE(f, D(f, "nonstr"), "s3"),
                              "nonstr.jsonl record 2: field 'text' is int"),
    "data record not an object": ("preprocess", lambda f: PRE(f, D(f, "array"), "s4"),
                                  "array.jsonl line 2: a JSON list, expected an object"),
    "data not UTF-8": ("preprocess", lambda f: PRE(f, D(f, "utf8"), "s5"), "not valid UTF-8"),
    "data file missing": ("preprocess", lambda f: PRE(f, str(f["dir"] / "none.jsonl"), "s6"), "none.jsonl"),
    "data output exists": ("preprocess", lambda f: PRE(f, D(f, "nonstr"), "not_empty"), "already exists"),
    # ---- tokenizers
    "tokenizer folder missing (preprocess)": ("preprocess", lambda f: PRE(f, D(f, "nonstr"), "s7",
                                                                          tok=str(f["dir"] / "notok")),
                                              "folder not found"),
    "tokenizer folder missing (train)": ("train", lambda f: TOK(f, str(f["dir"] / "notok")), "tokenizer folder not found"),
    "tokenizer relative path missing (train)": ("train", lambda f: TOK(f, "data/tokenizers/not-made-yet"),
                                                "tokenizer folder not found: data/tokenizers/not-made-yet (relative to"),
    "check: tokenizer missing": ("train", lambda f: TOK(f, str(f["dir"] / "notok"), "--check"),
                                 "tokenizer folder not found"),
    "check: output_dir holds a run": ("train", lambda f: ["--config", TINY, "--check", "--model.tokenizer_name",
                                                          f["tok"], "--data.datasets",
                                                          f"[{{path: {D(f, 'nonstr')}}}]", "--training.output_dir",
                                                          f["old_run"]], "already holds a run"),
    # ---- checkpoints and exports
    "export truncated (eval)": ("eval", lambda f: ["--model", f["trunc"]], "model.safetensors: not a readable weights"),
    "export truncated (inference)": ("inference", lambda f: ["--model", f["trunc"], "--prompt", "hi"],
                                     "model.safetensors: not a readable weights file"),
    "export truncated (convert)": ("convert", lambda f: ["--checkpoint", f["trunc"], "--output", str(f["dir"] / "o3")],
                                   "model.safetensors: not a readable weights file"),
    "export is a pickle (eval)": ("eval", lambda f: ["--model", f["pickled"]], "model.safetensors: not a readable"),
    "export folder without weights": ("eval", lambda f: ["--model", str(f["dir"] / "not_empty")], "not_empty"),
    "checkpoint code-running pickle (convert)": ("convert", lambda f: ["--checkpoint", f["evil_ckpt"], "--output",
                                                                       str(f["dir"] / "o4")],
                                                 "holds pickled objects that a weights-only load refuses"),
    "checkpoint truncated (convert)": ("convert", lambda f: ["--checkpoint", f["trunc_ckpt"], "--output",
                                                             str(f["dir"] / "o5")],
                                       "mp_rank_00_model_states.pt: not a readable weights file"),
}


def _tree(root):
    return {os.path.join(folder, name) for folder, dirs, names in os.walk(root) for name in dirs + names}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, files, capsys, monkeypatch):
    name, argv, message = CASES[case]
    argv = argv(files)
    before = _tree(files["dir"])
    monkeypatch.setattr(sys, "argv", [SCRIPTS[name], *argv])
    monkeypatch.setenv("MEGAMEM_NO_PROGRESS", "1")
    from megamem.cli import run_cli

    module = script(name)
    try:
        code = run_cli(lambda: module.main(argv) if name != "preprocess" else module.main())
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "[WARNING]" not in line
             and not line.startswith(("tokenizing", "Generating", "perplexity"))]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and "weights_only=False" not in err
    assert _tree(files["dir"]) == before, "files were left behind"
    assert not os.path.exists(files["marker"]), "a pickle was executed"


def test_the_catalogue_is_large():
    assert len(CASES) >= 40
