"""Benchmarks through lm-evaluation-harness, offline, on any model scripts/eval.py takes.

A task is one of: a task shipped with megamem (megamem/eval/tasks/NAME.yaml, e.g. megamem_mc), a
task YAML of your own (path/to/task.yaml; relative `data_files` are read beside it), or a name from
lm-eval's registry, whose data comes from the Hugging Face hub (or its local cache). Remote code
runs only for folders megamem wrote, or with trust_remote_code (--trust-remote-code).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

from ..config import ConfigError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def shipped_tasks() -> List[str]:
    """Names of the tasks megamem ships (megamem/eval/tasks/*.yaml)."""
    return sorted(n[:-5] for n in os.listdir(TASKS_DIR) if n.endswith(".yaml"))


def _beside(files: Any, folder: str) -> Any:
    """data_files with relative paths made relative to the task YAML's folder."""
    if isinstance(files, dict):
        return {k: _beside(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_beside(v, folder) for v in files]
    if isinstance(files, str) and "://" not in files and not os.path.isabs(files):
        return os.path.join(folder, files)
    return files


def task_spec(name: str) -> Union[str, Dict[str, Any]]:
    """A local task (shipped name or YAML path) as lm-eval's config dict; other names pass through."""
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(TASKS_DIR, name + ".yaml")
    if not os.path.isfile(path):
        if name.endswith((".yaml", ".yml")):
            raise ConfigError(f"--lm-eval-tasks {name}: no such task file")
        return name
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _beside(kwargs["data_files"], os.path.dirname(os.path.abspath(path)))
        cfg["dataset_kwargs"] = kwargs
    return cfg


def _hub_error(e: BaseException) -> bool:
    """True for the errors of reading a task's data from the hub without network or cache."""
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, (OSError, ConnectionError)) or any(
        w in text for w in ("offline", "couldn't reach", "connection", "not found on the hub", "doesn't exist on the hub",
                            "couldn't find", "datasetnotfound", "localentrynotfound"))


def megamem_wrote(folder: str) -> bool:
    """A megamem HF folder whose only code is megamem's own thin entries (megamem/hf/remote), unchanged."""
    import json

    from ..hf.folder import AUTO_MAP, REMOTE_FILES, is_megamem_folder

    if not is_megamem_folder(folder):
        return False
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        if json.load(f).get("auto_map", AUTO_MAP) != AUTO_MAP:
            return False
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf", "remote")
    code = [n for n in os.listdir(folder) if n.endswith(".py")]
    return set(code) <= set(REMOTE_FILES) and all(
        open(os.path.join(folder, n), "rb").read() == open(os.path.join(here, n), "rb").read() for n in code)


def _lm(model: str, batch_size: int, dtype: str, trust_remote_code: bool):
    """(model, model_args) for lm_eval.simple_evaluate: "hf" + the folder, or a loaded megamem model."""
    if os.path.isfile(os.path.join(model, "config.json")):
        trust = bool(trust_remote_code or megamem_wrote(model))
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return "hf", {"pretrained": model, "trust_remote_code": trust, "dtype": dtype, "device": device}
    import torch
    from lm_eval.models.huggingface import HFLM

    from .loading import load_any

    if os.path.isfile(os.path.join(model, "adapter.json")):  # lm-eval would see the base without its memory
        raise ConfigError(f"--lm-eval-tasks on base + adapter folders is not supported; {model}: evaluate a "
                          "merged or vanilla export")
    loaded = load_any(model, getattr(torch, dtype))  # an export or checkpoint megamem wrote: no remote code
    if loaded.tokenizer is None:
        raise ConfigError(f"{model}: no tokenizer saved with the model")
    return HFLM(pretrained=loaded.hf, tokenizer=loaded.tokenizer, batch_size=batch_size), None


def run_lm_eval(model: str, tasks: List[str], limit: Optional[int] = None, batch_size: int = 1,
                dtype: str = "float32", trust_remote_code: bool = False) -> Dict[str, dict]:
    """{task: metrics} of lm-eval's results for tasks on model (an export, checkpoint or HF folder)."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'megamem[eval]'") from None
    from lm_eval.tasks import TaskManager

    specs = [task_spec(t) for t in tasks]
    lm, model_args = _lm(model, batch_size, dtype, trust_remote_code)
    # local tasks alone need no index of lm-eval's thousands of registry tasks
    manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))
    try:
        results = lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=specs, limit=limit,
                                          batch_size=batch_size, task_manager=manager)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; the data ones are translated
        if "trust_remote_code" in str(e):
            raise ConfigError(f"{model} needs its own code to load; if you trust it, pass --trust-remote-code") \
                from None
        hub = [t for t, s in zip(tasks, specs) if isinstance(s, str)]
        if hub and _hub_error(e):
            raise ConfigError(
                f"lm-eval task(s) {', '.join(hub)}: their data is on the Hugging Face hub and not readable here "
                f"({type(e).__name__}); offline, provide the data as local files: a task YAML with dataset_path: "
                "json and dataset_kwargs.data_files (like megamem/eval/tasks/megamem_mc.yaml), passed as "
                "--lm-eval-tasks path/to/task.yaml, or a datasets cache filled where the hub is reachable") from None
        raise
    return results["results"]
