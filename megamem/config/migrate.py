"""Configs of the other trainers megamem replaces, rewritten as megamem YAML.

Three source layouts are recognised by their top-level keys: the PEER + MLA trainer's
(`model_config / train_config / dataset_config / eval_config / wandb_config`), the long-context
trainer's (`experiment_name, pretrained, model.pos_encoding, training, data, evaluation, system, …`)
and Stack-Wise's (`model.d_model / training.mode …`). Every source key either maps to a megamem key
(maybe with its value translated) or is refused with what to use instead; `drop` names keys the
user chooses to leave out. Nothing is skipped silently.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

Rule = Any  # a target "section.key", a function value → [(target, value)], or a Refuse
Pairs = List[Tuple[str, Any]]


class Refuse:
    """A source key with no meaning here, and what to do instead (values in `allowed` convert to nothing)."""

    def __init__(self, instead: str, allowed: Iterable[Any] = ()):
        self.instead, self.allowed = instead, tuple(allowed)


def _to(*targets: str) -> Callable[[Any], Pairs]:
    return lambda v: [(t, v) for t in targets]


def _precision(name: str) -> Callable[[Any], Pairs]:
    """fp16: true / bf16: true → training.mixed_precision; false says nothing by itself."""
    return lambda v: [("training.mixed_precision", name)] if v else []


def _scheduler(v: Any) -> Pairs:
    table = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant",
             "warmup_stable_decay": "wsd", "wsd": "wsd"}
    if v not in table:
        raise _Refused(f"lr_scheduler_type '{v}': megamem has cosine, linear, constant, wsd (training.scheduler)")
    return [("training.scheduler", table[v])]


def _dataset_entry(entry: Any) -> Dict[str, Any]:
    """A source dataset entry → a data.datasets entry (path: a local file/glob or a hub dataset name)."""
    if not isinstance(entry, dict):
        raise _Refused(f"dataset entry {entry!r} is not a mapping")
    out: Dict[str, Any] = {}
    for key, value in entry.items():
        if key in ("subset", "split", "streaming", "weight", "text_field", "text_template", "eval_split"):
            out[key] = value
        elif key == "path":
            local = os.path.exists(value) or str(value).startswith((".", "/", "~")) or any(
                c in str(value) for c in "*?") or os.path.splitext(str(value))[1] in (".jsonl", ".json", ".txt",
                                                                                      ".csv", ".parquet")
            out["path" if local else "name"] = value
        elif key == "name":
            out.setdefault("label", value)
        elif key == "format":
            raise _Refused("dataset format: megamem reads the format from the file extension (.txt, .jsonl, .json, "
                           ".csv, .parquet, optionally compressed); remove format")
        else:
            raise _Refused(f"dataset key '{key}' has no megamem counterpart (data.datasets entries take name, path, "
                           "subset, split, eval_split, eval_path, weight, text_field, text_template, streaming)")
    label = out.pop("label", None)
    if "name" not in out and label is not None:
        out["name"] = label  # a label for local files
    return out


def _datasets(v: Any) -> Pairs:
    return [("data.datasets", [_dataset_entry(e) for e in (v or [])])]


def _mla(v: Any) -> Pairs:
    return [("model.attention_type", "mla"), ("model.mla_config", v)]


def _wandb(v: Any) -> Pairs:
    return [("training.log_to_wandb", v is not None)]


def _attention_mode(v: Any) -> Pairs:
    """causal, or bidirectional (valid with training.time_step_masking only: validation says so)."""
    return [("model.attention_mode", v)]


class _Refused(Exception):
    pass


# eval_config.evals names of the PEER + MLA trainer → lm-evaluation-harness task names
LM_EVAL_NAMES = {"hellaswag": "hellaswag", "mmlu": "mmlu", "truthfulqa": "truthfulqa_mc2", "gsm8k": "gsm8k"}


def _evals(v: Any) -> Pairs:
    """eval_config.evals → evaluation.evals (lm-eval names) with benchmarks perplexity + lm_eval."""
    names = [v] if isinstance(v, str) else list(v or [])
    if "humaneval" in names:
        raise _Refused("humaneval executes the generated code, which megamem never runs; "
                       "drop it (or run lm-eval's humaneval yourself)")
    return [("evaluation.evals", [LM_EVAL_NAMES.get(n, n) for n in names]),
            ("evaluation.benchmarks", ["perplexity", "lm_eval"] if names else ["perplexity"])]


LATER = "is not available in this version of megamem"

PEER_MLA: Dict[str, Rule] = {
    "model_config.hidden_size": "model.hidden_dim",
    "model_config.num_hidden_layers": "model.num_layers",
    "model_config.num_attention_heads": "model.num_heads",
    "model_config.num_key_value_heads": "model.num_kv_heads",
    "model_config.intermediate_size": "model.intermediate_dim",
    "model_config.vocab_size": "model.vocab_size",
    "model_config.max_position_embeddings": "model.max_seq_len",
    "model_config.initializer_range": "model.initializer_range",
    "model_config.layer_norm_eps": "model.norm_eps",
    "model_config.use_peer": "model.use_peer",
    "model_config.peer_start_layer": "model.peer_start_layer",
    "model_config.peer_config": "model.peer_config",
    "model_config.mla_config": _mla,
    "train_config.output_dir": "training.output_dir",
    "train_config.per_device_train_batch_size": "training.batch_size",
    "train_config.per_device_eval_batch_size": Refuse("megamem evaluates with training.batch_size; remove it"),
    "train_config.gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "train_config.learning_rate": "training.learning_rate",
    "train_config.weight_decay": "training.weight_decay",
    "train_config.max_grad_norm": "training.max_grad_norm",
    "train_config.max_steps": "training.max_steps",
    "train_config.num_train_epochs": "training.num_epochs",
    "train_config.steps_per_epoch": Refuse("megamem counts epochs over the data itself; with streaming sources "
                                           "give train_config.max_steps instead"),
    "train_config.lr_scheduler_type": _scheduler,
    "train_config.warmup_ratio": "training.warmup_ratio",
    "train_config.warmup_steps": "training.warmup_steps",
    "train_config.log_level": Refuse("megamem logs at info level; remove log_level", allowed=("info",)),
    "train_config.logging_steps": "training.logging_steps",
    "train_config.save_steps": "training.save_steps",
    "train_config.eval_steps": "training.eval_steps",
    "train_config.seed": "training.seed",
    "train_config.fp16": _precision("fp16"),
    "train_config.bf16": _precision("bf16"),
    "train_config.tf32": Refuse("megamem leaves TF32 off; remove tf32", allowed=(False,)),
    "train_config.resume_from_checkpoint": "training.resume_from_checkpoint",
    "dataset_config.datasets": _datasets,
    "dataset_config.tokenizer_name": "model.tokenizer_name",
    "dataset_config.max_seq_length": "training.max_length",
    "eval_config.evals": _evals,
    "eval_config.eval_batch_size": "evaluation.eval_batch_size",
    "eval_config.evals_registry_path": Refuse("OpenAI Evals registries are not read; use lm-evaluation-harness "
                                              "tasks with scripts/eval.py --lm-eval-tasks"),
    "wandb_config": _wandb,
    "wandb_config.project": "training.wandb_project",
    "wandb_config.name": "training.wandb_run_name",
    "wandb_config.entity": Refuse("set WANDB_ENTITY in the environment of the run"),
    "wandb_config.log_model": Refuse("megamem does not upload checkpoints to wandb; remove log_model",
                                     allowed=(None, False)),
}

def _benchmarks(v: Any) -> Pairs:
    """niah and ruler run as megamem's NIAH grid and RULER synthetic tasks; InfiniteBench needs its data."""
    bad = [b for b in v or [] if b not in ("niah", "ruler", "perplexity")]
    if bad:
        raise _Refused(f"benchmarks {bad}: megamem runs niah, ruler and perplexity (InfiniteBench needs its data "
                       "files and is not generated); remove the others")
    return [("evaluation.benchmarks", list(v or []))]


def _qlora_configs(v: Any) -> Pairs:
    """Stack-Wise's {stack: {rank, alpha}} mapping → training.progressive.qlora_configs entries."""
    if not isinstance(v, dict) or not all(isinstance(e, dict) and set(e) <= {"rank", "alpha"} for e in v.values()):
        raise _Refused("qlora_configs must map a stack index to {rank, alpha}")
    return [("training.progressive.qlora_configs", [{"stack": int(k), **e} for k, e in v.items()])]


def _metrics(v: Any) -> Pairs:
    bad = [m for m in v or [] if m not in ("string_match_all", "string_match_part")]
    if bad:
        raise _Refused(f"metrics {bad}: NIAH/RULER are scored by string_match_all and string_match_part; "
                       "perplexity is a benchmark (evaluation.benchmarks)")
    return [("evaluation.metrics", list(v or []))]


def _attractor(v: Any) -> Pairs:
    """The same keys (megamem's attractor is causal, N of exp_c_over_N is model.max_seq_len: docs/positions.md);
    a `custom` placement is its layer list."""
    if isinstance(v, dict) and v.get("inject_layers") == "custom":
        raise _Refused("inject_layers 'custom': give the layer list itself (model.attractor.inject_layers: [0, 3])")
    return [("model.attractor", v)]


LONG_CONTEXT: Dict[str, Rule] = {
    "experiment_name": "training.wandb_run_name",
    "run_name": "training.wandb_run_name",
    "output_dir": "training.output_dir",
    "logging_dir": Refuse("metrics.jsonl is written in training.output_dir; remove logging_dir"),
    "pretrained.model_name_or_path": "model.base_model_name",
    "pretrained.trust_remote_code": Refuse("megamem loads supported families without remote code; remove it",
                                           allowed=(False,)),
    "pretrained.torch_dtype": Refuse("the base's dtype follows training.mixed_precision; remove torch_dtype"),
    "pretrained.load_in_4bit": "model.load_in_4bit",
    "pretrained.load_in_8bit": Refuse("megamem quantises bases to 4-bit only (model.load_in_4bit)", allowed=(False,)),
    "pretrained.use_flash_attn": "model.use_flash_attention",
    "pretrained.device_map": Refuse("DeepSpeed places the model on the ranks' devices; remove device_map"),
    "model.pos_encoding": "model.pos_encoding",
    "model.attractor": _attractor,
    "training.batch_size": "training.batch_size",
    "training.gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "training.num_epochs": "training.num_epochs",
    "training.learning_rate": "training.learning_rate",
    "training.weight_decay": "training.weight_decay",
    "training.max_grad_norm": "training.max_grad_norm",
    "training.lr_scheduler_type": _scheduler,
    "training.warmup_steps": "training.warmup_steps",
    "training.bf16": _precision("bf16"),
    "training.logging_steps": "training.logging_steps",
    "training.eval_steps": "training.eval_steps",
    "training.save_steps": "training.save_steps",
    "training.seed": "training.seed",
    "training.deterministic": Refuse("megamem runs are seeded (training.seed) but not bitwise deterministic "
                                     "on every kernel; remove deterministic", allowed=(False,)),
    "data.dataset_name": "training.dataset_name",
    "data.data_dir": Refuse("name local files in data.datasets entries: {path: 'DIR/*.jsonl'}"),
    "data.max_seq_length": "training.max_length",
    "data.preprocessing_num_workers": Refuse("pre-tokenize with tools/preprocess_data.py --workers N"),
    "data.dataloader_num_workers": "data.num_workers",
    "evaluation.benchmarks": _benchmarks,
    "evaluation.niah_lengths": "evaluation.niah_lengths",
    "evaluation.niah_depths": "evaluation.niah_depths",
    "evaluation.ruler_tasks": "evaluation.ruler_tasks",  # RULER's names; others are refused by validation
    "evaluation.ruler_max_length": "evaluation.ruler_max_length",
    "evaluation.max_new_tokens": "evaluation.max_new_tokens",
    "evaluation.temperature": "evaluation.temperature",
    "evaluation.top_k": "evaluation.top_k",
    "evaluation.top_p": "evaluation.top_p",
    "evaluation.do_sample": "evaluation.do_sample",
    "evaluation.metrics": _metrics,
    "system.device": Refuse("the launcher decides the devices (deepspeed/torchrun/srun); remove device"),
    "system.num_gpus": "training.num_gpus",
    "system.window_size": "model.window_size",
    "system.gradient_checkpointing": "training.gradient_checkpointing",
    "system.cpu_offload": Refuse("launch with --deepspeed ds_configs/zero3_offload.json", allowed=(False,)),
    "system.use_flash_attention": "model.use_flash_attention",
    "system.compile_model": Refuse("torch.compile is not applied by scripts/train.py; remove compile_model",
                                   allowed=(False,)),
    "system.log_memory": Refuse("megamem does not log device memory; remove log_memory", allowed=(False,)),
    "system.log_throughput": Refuse("megamem always logs tokens/s; remove log_throughput", allowed=(True, False)),
    "ablation_mode": "evaluation.ablation_mode",  # tools/ablate.py knows the named modes (irrational, hybrid_k, ...)
    "ablation_values": "evaluation.ablation_values",
}

STACK_WISE: Dict[str, Rule] = {
    "model.vocab_size": "model.vocab_size",
    "model.d_model": "model.hidden_dim",
    "model.n_layers": "model.num_layers",
    "model.n_heads": "model.num_heads",
    "model.n_kv_heads": "model.num_kv_heads",
    "model.d_ff": "model.intermediate_dim",
    "model.attention_type": "model.attention_type",
    "model.attention_mode": _attention_mode,
    "model.use_rope": "model.use_rope",
    "model.tie_embeddings": "model.tie_embeddings",
    "training.learning_rate": "training.learning_rate",
    "training.batch_size": "training.batch_size",
    "training.max_steps": "training.max_steps",
    **{f"training.{k}": f"training.{k}" for k in ("mode", "fusion_mode", "block_size", "total_blocks",
                                                    "epochs_per_layer", "current_block_lr", "weight_decay")},
    "training.epochs_per_block": "training.epochs_per_layer",
    "training.seq_len": "training.max_length",
    "training.log_interval": "training.logging_steps",
    "training.save_interval": "training.save_steps",
    "training.validation_interval": "training.eval_steps",
    # LoRA on the trunk and its precision (megamem.config.trunk_lora): the same keys; the guide's
    # progressive.qlora_enabled / qlora_rank / qlora_alpha are training.*; qlora_configs {k: {rank, alpha}} a list
    **{f"training.{k}": f"training.{k}" for k in ("qlora_enabled", "qlora_rank", "qlora_alpha", "qlora_lr",
                                                    "quantization_enabled", "quantization_type")},
    **{f"training.progressive.{k}": f"training.progressive.{k}" for k in (
        "enabled", "trunk_strategy", "new_stack_precision", "qlora_strategy", "qlora_rank_pattern",
        "qlora_alpha_pattern", "progressive_qlora", "progressive_qlora_rank", "progressive_qlora_alpha")},
    **{f"training.progressive.{k}": f"training.{k}" for k in ("qlora_enabled", "qlora_rank", "qlora_alpha")},
    "training.progressive.qlora_configs": _qlora_configs,
    **{f"training.{k}": f"training.{k}" for k in ("time_step_masking", "num_time_steps", "time_step_mask_fractions",
                                                    "min_mask_fraction", "max_mask_fraction", "mask_schedule_type",
                                                    "mask_token_id")},
    "training.*": Refuse(f"this Stack-Wise training key {LATER}; see docs/progressive.md for the keys megamem reads"),
    "data.*": Refuse("name the data in data.datasets entries (megamem's data section)"),
    "precision_options.*": Refuse("use training.mixed_precision (no, bf16, fp16)"),
}

LAYOUTS = {"PEER + MLA trainer": PEER_MLA, "long-context trainer": LONG_CONTEXT, "Stack-Wise trainer": STACK_WISE}
# keys whose value is a mapping converted as a whole (not walked key by key)
WHOLE = {"model_config.peer_config", "model_config.mla_config", "model.pos_encoding", "dataset_config.datasets",
         "model.attractor", "training.progressive.qlora_configs"}


def detect_layout(data: Dict[str, Any]) -> str:
    top = set(data)
    if top & {"model_config", "train_config", "dataset_config", "eval_config", "wandb_config"}:
        return "PEER + MLA trainer"
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if top & {"experiment_name", "pretrained", "system", "evaluation", "ablation_mode"} or \
            {"pos_encoding", "attractor"} & set(model):
        return "long-context trainer"
    if {"d_model", "n_layers", "n_heads", "d_ff", "attention_mode"} & set(model) or "precision_options" in top:
        return "Stack-Wise trainer"
    raise _Refused("not a config of a known source layout (PEER + MLA: model_config/train_config/...; long-context: "
                   "experiment_name/pretrained/system/model.pos_encoding; Stack-Wise: model.d_model/training.mode); "
                   "megamem configs need no conversion")


def _leaves(data: Any, prefix: str = "") -> Iterable[Tuple[str, Any]]:
    if isinstance(data, dict) and prefix not in WHOLE:
        if prefix in ("wandb_config",):
            yield prefix, data
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, data


def _rule(rules: Dict[str, Rule], key: str) -> Optional[Rule]:
    if key in rules:
        return rules[key]
    return next((r for pattern, r in rules.items() if "*" in pattern and fnmatch.fnmatchcase(key, pattern)), None)


def migrate(data: Any, drop: Iterable[str] = ()) -> Tuple[str, Dict[str, Dict[str, Any]], List[str], List[str]]:
    """(layout, megamem config dict, problems, notes). Problems name each source key that has no meaning
    here and what to use instead; notes say what megamem sets that the source left implicit."""
    if not isinstance(data, dict):
        return "", {}, ["the top level must be a mapping of sections"], []
    try:
        layout = detect_layout(data)
    except _Refused as e:
        return "", {}, [str(e)], []
    rules, out, problems, notes = LAYOUTS[layout], {}, [], []
    for key, value in _leaves(data):
        if any(key == d or key.startswith(d + ".") or fnmatch.fnmatchcase(key, d) for d in drop):
            continue
        rule = _rule(rules, key)
        try:
            if rule is None:
                raise _Refused("has no megamem counterpart")
            if isinstance(rule, Refuse):
                if any(value is a or (type(value) is type(a) and value == a) for a in rule.allowed):
                    continue  # the value says what megamem does anyway
                raise _Refused(rule.instead)
            pairs = rule(value) if callable(rule) else [(rule, value)]
        except _Refused as e:
            problems.append(f"{key}: {e}")
            continue
        for target, v in pairs:
            *parents, field = target.split(".")
            node = out
            for part in parents:  # nested sections: training.progressive.trunk_strategy
                node = node.setdefault(part, {})
            node[field] = v
    _precision_default(data, layout, out, problems, notes)
    if layout == "PEER + MLA trainer":
        out.setdefault("memory", {})["vanilla_mode"] = True
        notes.append("memory.vanilla_mode: true — the source's models have no memory bank (set it false and add "
                     "memory keys to train one)")
    return layout, out, problems, notes


def _precision_default(data, layout: str, out, problems: List[str], notes: List[str]) -> None:
    """fp16 and bf16 both true is a contradiction; both false (or absent where the source means fp32) is 'no'."""
    section = {"PEER + MLA trainer": "train_config", "long-context trainer": "training"}.get(layout)
    src = data.get(section) if section else None
    if not isinstance(src, dict):
        return
    if src.get("fp16") is True and src.get("bf16") is True:
        problems.append(f"{section}.fp16 and {section}.bf16 are both true; keep one (training.mixed_precision)")
    elif ("fp16" in src or "bf16" in src) and not src.get("fp16") and not src.get("bf16"):
        out.setdefault("training", {})["mixed_precision"] = "no"
        notes.append("training.mixed_precision: no — fp16 and bf16 are off in the source (for float8 set "
                     "training.mixed_precision: fp8: CUDA compute capability ≥ 8.9 and torchao)")
