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
        ours_step, compile_s, compile_error = train_step(ours, ids), None, None
        if compile_model:  # guarded: a compiler problem reports itself and the eager model is measured
            import torch

            start = time.perf_counter()
            try:
                compiled = train_step(torch.compile(ours), ids)
                compiled()
                ours_step, compile_s = compiled, time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - inductor raises many kinds
                compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res = alternate({"megamem": ours_step, "transformers": train_step(theirs, ids, hf=True)}, iters, warmup)
        tokens = batch * size["seq"]
        rows.append({"dtype": name, "batch": batch, "seq": size["seq"], "compiled": compile_s is not None,
                     "compile_s": compile_s, "compile_error": compile_error,
                     "megamem_tokens_per_s": tokens / res["megamem"]["median_s"],
                     "transformers_tokens_per_s": tokens / res["transformers"]["median_s"],
                     "ratio": speedup(res, "megamem", "transformers"),
                     "target": 1.0 if name == "fp32" else 1.25})
        rows[-1]["met"] = rows[-1]["ratio"] >= rows[-1]["target"]
    return {"rows": rows}
