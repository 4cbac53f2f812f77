"""The files of a megamem checkpoint folder, read as data: its COMPLETE marker and `latest` pointer,
DeepSpeed's engine files (torch.load with an allow-list, never pickled code) and the chapter-bank
shards trained outside the engine (`chapter_banks_rank{r}.safetensors`).

Training writes these folders (megamem.train.checkpoint); everything that reads weights out of them
(training.init_from, the Hugging Face converter, evaluation) reads them through this module and
megamem.parallel.weights, which sit below both.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, List

import torch

from ..config import ConfigError
from ..safe_load import open_safetensors, weights_error

COMPLETE = "COMPLETE"


def complete_tags(ckpt_dir: str) -> List[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, t, COMPLETE)))


def resolve_resume(path: str, output_dir: str, key: str = "training.resume_from_checkpoint") -> tuple:
    """`latest`, a checkpoints folder, or one checkpoint folder → (checkpoints dir, tag)."""
    ckpt_dir = os.path.join(output_dir, "checkpoints") if path == "latest" else path
    if os.path.isfile(os.path.join(ckpt_dir, COMPLETE)):  # a single checkpoint folder
        return os.path.dirname(os.path.abspath(ckpt_dir)), os.path.basename(os.path.abspath(ckpt_dir))
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        raise ConfigError(f"{key}: no checkpoint at {ckpt_dir} (no 'latest' file)")
    tag = open(latest, encoding="utf-8").read().strip()
    if not os.path.isfile(os.path.join(ckpt_dir, tag, COMPLETE)):
        raise ConfigError(f"{key}: {os.path.join(ckpt_dir, tag)} is incomplete")
    return ckpt_dir, tag


def banks_from_checkpoint(folder: str) -> Dict[str, torch.Tensor]:
    """Whole banks (`banks.<name>` keys) from a checkpoint's chapter_banks_rank*.safetensors; {} if it has none.

    The engine's files hold a stale copy of these banks; megamem.parallel.weights.read_weights adds these.
    Ranks 0 … ep_size−1 form the first expert-parallel group, holding chapter shards in rank order.
    """
    first = os.path.join(folder, "chapter_banks_rank0.safetensors")
    if not os.path.isfile(first):
        return {}
    with open_safetensors(first) as f:
        ep = int(f.metadata().get("ep_size", 1))
    parts: Dict[str, list] = {}
    for r in range(ep):
        file = os.path.join(folder, f"chapter_banks_rank{r}.safetensors")
        if not os.path.isfile(file):
            raise ConfigError(f"{folder}: chapter shards of ep_size {ep} need chapter_banks_rank0 … {ep - 1}; "
                              f"{os.path.basename(file)} is missing (an incomplete copy of the checkpoint?)")
        with open_safetensors(file) as f:
            for key in f.keys():
                if key.startswith("param."):
                    parts.setdefault(f"banks.{key[len('param.'):]}", []).append(f.get_tensor(key))
    return {name: torch.cat(shards) for name, shards in parts.items()}


class safe_torch_load:
    """Within this context torch.load ignores weights_only=False: checkpoints load as data only.

    DeepSpeed passes weights_only=False everywhere; its checkpoints hold only tensors, numbers,
    strings and a few plain enums, which are allow-listed here.
    """

    def __enter__(self):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        self._orig = torch.load
        torch.serialization.add_safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler, set,
                                              argparse_namespace()])
        orig = self._orig

        def load(f, *args, **kwargs):
            kwargs["weights_only"] = True
            try:
                return orig(f, *args, **kwargs)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
                raise weights_error(str(f), e) from None

        torch.load = load
        return self

    def __exit__(self, *exc):
        torch.load = self._orig
        return False


def argparse_namespace():
    import argparse

    return argparse.Namespace
