"""Loading weight files as data only, with one clear error naming the file.

safetensors files hold no code; torch files are read with `weights_only=True`, so a pickle that
would run code is refused and never executed. A truncated or corrupt file, or a code-running
pickle, becomes a ConfigError (exit 2 in the scripts) naming the file — never a traceback, and never
torch's advice to retry with weights_only=False, which would run the pickle.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from typing import Any, Dict, Iterator

import torch

from .config import ConfigError


def _why(e: BaseException) -> str:
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text) or re.search(r"Unsupported operand \d+", text)
    if found:
        return found.group(0)
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def weights_error(path: str, e: BaseException) -> ConfigError:
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
        return ConfigError(f"{path}: holds pickled objects that a weights-only load refuses ({_why(e)}); megamem "
                           "never executes pickled code: use files written by megamem, or re-save the weights as "
                           "safetensors")
    return ConfigError(f"{path}: not a readable weights file ({_why(e)}); it is truncated or corrupt: re-export it, "
                       "or resume from an earlier checkpoint")


def torch_load_weights(path: str, **kwargs) -> Any:
    """torch.load(path, weights_only=True) with errors as a ConfigError naming the file."""
    kwargs["weights_only"] = True
    try:
        return torch.load(path, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise weights_error(path, e) from None


def load_safetensors(path: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError: a damaged or foreign file
        raise weights_error(path, e) from None


@contextlib.contextmanager
def open_safetensors(path: str) -> Iterator[Any]:
    """safetensors.safe_open(path, "pt"), a damaged file named in a ConfigError."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001
        raise weights_error(path, e) from None
    with handle as f:
        yield f
