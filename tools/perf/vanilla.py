"""Train tokens/s of megamem (vanilla mode) over transformers' LlamaForCausalLM of the same shape and weights."""
from __future__ import annotations

from typing import Dict, List

from .models import DTYPES, build, hf_twin, megamem_config, random_ids, train_step
from .timing import alternate, speedup


def run(size: Dict[str, int], dtypes: List[str], iters: int, warmup: int) -> Dict:
    rows = []
    for name in dtypes:
        dt = DTYPES[name]
        batch = size["batch_" + name] if "batch_" + name in size else size["batch"]
        cfg = megamem_config(size)
        ours = build(cfg, dt)
        theirs = hf_twin(ours, cfg, dt)
        ids = random_ids(size["vocab"], batch, size["seq"])
        res = alternate({"megamem": train_step(ours, ids), "transformers": train_step(theirs, ids, hf=True)},
                        iters, warmup)
        tokens = batch * size["seq"]
        rows.append({"dtype": name, "batch": batch, "seq": size["seq"],
                     "megamem_tokens_per_s": tokens / res["megamem"]["median_s"],
                     "transformers_tokens_per_s": tokens / res["transformers"]["median_s"],
                     "ratio": speedup(res, "megamem", "transformers"),
                     "target": 1.0 if name == "fp32" else 1.25})
        rows[-1]["met"] = rows[-1]["ratio"] >= rows[-1]["target"]
    return {"rows": rows}
