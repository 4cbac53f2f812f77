"""Train tokens/s of megamem (vanilla mode) over transformers' LlamaForCausalLM of the same shape and weights."""
from __future__ import annotations

import time
from typing import Dict, List

from .models import DTYPES, build, hf_twin, megamem_config, random_ids, train_step
from .timing import alternate, speedup


def run(size: Dict[str, int], dtypes: List[str], iters: int, warmup: int, compile_model: bool = False) -> Dict:
    """compile_model: torch.compile the megamem side (the first, untimed warm-up step pays the compile)."""
    rows = []
    for name in dtypes:
        dt = DTYPES[name]
        batch = size.get("batch_" + name, size["batch"])
        cfg = megamem_config(size)
        ours = build(cfg, dt)
        theirs = hf_twin(ours, cfg, dt)
        ids = random_ids(size["vocab"], batch, size["seq"])
        ours_step, compile_s = train_step(ours, ids), None
        if compile_model:
            import torch

            start = time.perf_counter()
            ours_step = train_step(torch.compile(ours), ids)
            ours_step()
            compile_s = time.perf_counter() - start
        res = alternate({"megamem": ours_step, "transformers": train_step(theirs, ids, hf=True)}, iters, warmup)
        tokens = batch * size["seq"]
        rows.append({"dtype": name, "batch": batch, "seq": size["seq"], "compiled": compile_model,
                     "compile_s": compile_s,
                     "megamem_tokens_per_s": tokens / res["megamem"]["median_s"],
                     "transformers_tokens_per_s": tokens / res["transformers"]["median_s"],
                     "ratio": speedup(res, "megamem", "transformers"),
                     "target": 1.0 if name == "fp32" else 1.25})
        rows[-1]["met"] = rows[-1]["ratio"] >= rows[-1]["target"]
    return {"rows": rows}
