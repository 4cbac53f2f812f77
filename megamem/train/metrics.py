"""What a run reports: a tqdm bar on rank 0, metrics.jsonl, optional wandb, throughput and MFU.

metrics.jsonl has one JSON object per line; training records carry
    {"kind": "train", "step", "loss", "lm_loss", <aux loss names>, "lr" (first group), "lr_<group>",
     "grad_norm", "tokens_per_s", "mfu", "step_time_s", "skipped_nonfinite",
     memory models: "memory/L<layer>/rel_norm", "…/entropy", "…/entropy_norm", "…/rows_touched"
     (megamem.train.diagnostics, docs/diagnostics.md)}
evaluation records {"kind": "eval", "step", "eval_loss", "eval_ppl", "eval_tokens"}, and with PEER
(model.peer_config.log_expert_usage, every log_freq steps) {"kind": "experts", "step",
"peer<layer>_usage", "peer<layer>_unevenness", "peer<layer>_hot_experts", "peer<layer>_hot_fraction"}.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Optional

import torch

from ..config import ConfigError, MegamemConfig, config_to_dict
from ..model.flops import flops_per_token  # noqa: F401 (re-exported: the definition behind MFU)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, ranks: int) -> float:
    """Model FLOPs utilisation: model FLOPs computed per second over the measured peak of all ranks."""
    return tokens_per_s * flops_per_token / (peak_flops * ranks)


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5,
                       megamem_kernels: bool = True) -> float:
    """Achievable matmul FLOP/s of this process's device and threads (the MFU denominator), through the
    GEMM path the model's matmuls take: megamem's (`megamem.ops.linear`: bf16 widened to fp32 on CPUs
    without bf16 GEMMs) for megamem models, torch's own for Hugging Face bases (adapters)."""
    from ..ops import linear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul = (lambda: linear(a, b)) if megamem_kernels else (lambda: a @ b.T)
    matmul().sum().item()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul().sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _interactive() -> bool:
    """A terminal shows the progress bar; a job log (SLURM, nohup, a pipe) gets a line per logged step."""
    import sys

    return sys.stderr.isatty()


def train_line(record: Dict[str, Any], total_steps: int) -> str:
    grad = record.get("grad_norm")
    return (f"step {record['step']}/{total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.3g}, "
            f"grad_norm {'n/a' if grad is None else f'{grad:.3g}'}, {record['tokens_per_s']:,.0f} tokens/s")


class MetricsLogger:
    def __init__(self, cfg: MegamemConfig, output_dir: str, rank: int, total_steps: int, start_step: int = 0):
        self.rank, self.t, self.total_steps = rank, cfg.training, total_steps
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.bar = None
        self.wandb = None
        self.output_dir = output_dir
        if rank != 0:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=os.environ.get("MEGAMEM_NO_PROGRESS") == "1")
        if self.t.log_to_wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("training.log_to_wandb: wandb is not installed; pip install 'megamem[wandb]' "
                                  "or set log_to_wandb: false") from None
            os.makedirs(output_dir, exist_ok=True)
            self.wandb = wandb.init(project=self.t.wandb_project, name=self.t.wandb_run_name, dir=output_dir,
                                    config=config_to_dict(cfg), resume="allow")

    def log(self, record: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        clean = {k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in record.items()}
        os.makedirs(self.output_dir, exist_ok=True)  # created by the first record: a run failing before it leaves none
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if k not in ("kind", "step")}, step=clean["step"])
        if clean.get("kind") == "eval" and self.bar is not None:
            self.bar.write(f"step {clean['step']}: eval loss {clean['eval_loss']:.4f}, ppl {clean['eval_ppl']:.2f}")
        elif clean.get("kind") == "train" and self.bar is not None and not _interactive():
            self.bar.write(train_line(clean, self.total_steps))


    def step(self, loss: Optional[float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None and math.isfinite(loss):
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
