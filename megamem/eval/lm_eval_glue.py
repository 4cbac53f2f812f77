"""Multiple-choice benchmarks through lm-evaluation-harness, on an exported Hugging Face folder.

Offline: lm-eval reads task data with `datasets`; pre-download once (or copy the HF cache), then set
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 — see docs/export-inference-eval.md, "Evaluation".
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from ..config import ConfigError


def run_lm_eval(folder: str, tasks: List[str], limit: Optional[int] = None, batch_size: int = 1,
                dtype: str = "float32") -> Dict[str, dict]:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"--lm-eval-tasks needs a Hugging Face folder; convert {folder} first: "
                          f"python tools/convert_to_hf.py --checkpoint {folder} --output <dir>")
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("--lm-eval-tasks needs lm-evaluation-harness: pip install lm-eval") from None
    try:
        results = lm_eval.simple_evaluate(model="hf", tasks=tasks, limit=limit, batch_size=batch_size,
                                          model_args=f"pretrained={folder},trust_remote_code=True,dtype={dtype}")
    except (OSError, ConnectionError) as e:
        raise ConfigError(f"lm-eval could not read its task data ({type(e).__name__}: {e}); offline, pre-download the "
                          "tasks and set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1") from None
    return results["results"]
