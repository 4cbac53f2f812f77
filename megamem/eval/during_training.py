"""Long-context scores at the trainer's evaluations (training.eval_long_context), from the run's
`evaluation:` section: NIAH and/or RULER on the model being trained, flattened for metrics.jsonl."""
from __future__ import annotations

from typing import Callable, Dict

import torch

from ..config import ConfigError


def long_context_eval(cfg, tokenizer) -> Callable[[torch.nn.Module], Dict[str, float]]:
    """A function model → {niah_mean, niah_<length>_<depth>, ruler_<task>_<length>, ruler_mean_<length>, ...}."""
    from ..hf.modeling import MegamemForCausalLM
    from .loading import Loaded
    from .long_context import ruler_lengths, run_niah, run_ruler, text_model

    if cfg.model.base_model_name is not None:
        raise ConfigError("training.eval_long_context: adapter runs are evaluated after training "
                          "(python scripts/eval.py --model OUTPUT_DIR/final --benchmarks niah ruler)")
    if tokenizer is None:
        raise ConfigError("training.eval_long_context needs the run's tokenizer (model.tokenizer_name)")
    ev = cfg.evaluation

    @torch.no_grad()
    def run(model: torch.nn.Module) -> Dict[str, float]:
        hf = MegamemForCausalLM.from_megamem(model, cfg).eval()  # a wrapper: the weights are shared
        tm = text_model(Loaded(hf, tokenizer, cfg, model), ev.max_new_tokens, ev.chat_template, ev.temperature,
                        ev.top_k, ev.top_p, ev.do_sample)
        out: Dict[str, float] = {}
        if "niah" in ev.benchmarks:
            niah = run_niah(tm, ev.niah_lengths, ev.niah_depths, ev.num_samples, ev.seed, ev.max_new_tokens,
                            ev.niah_task, ev.haystack)
            cells = {f"niah_{n}_{float(d):g}": v for n, row in niah["grid"].items() for d, v in row.items()}
            out.update(cells, niah_mean=sum(cells.values()) / len(cells))
        if "ruler" in ev.benchmarks:
            lengths = ev.ruler_lengths or ruler_lengths(ev.ruler_max_length)
            ruler = run_ruler(tm, ev.ruler_tasks, lengths, ev.num_samples, ev.seed, ev.max_new_tokens, (),
                              ev.effective_threshold)
            out.update({f"ruler_{t}_{n}": v for t, row in ruler["scores"].items() for n, v in row.items()})
            out.update({f"ruler_mean_{n}": v for n, v in ruler["average"].items()})
            out["ruler_effective_length"] = ruler["effective_length"] or 0
        return out

    return run
