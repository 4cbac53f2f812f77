"""Writing whole folders (exports, HF folders): atomic, stamped, readable, and never over foreign data.

- A folder is written beside its destination (`<path>.tmp-<pid>`), then swapped in: the old folder
  is renamed aside, the new one renamed into place, and only then is the old one deleted. A crash
  leaves either the old folder, or the new one (and at worst `<path>.old-<pid>` next to it), never
  half of one and never none.
- Every folder megamem writes carries `megamem_format.json` (kind, format version, megamem version).
  An existing destination is replaced only when it is empty or carries that stamp: megamem never
  deletes a folder it did not create (`--output . --force` is refused).
- Files are created readable by the group and others as the umask allows (safetensors writes 0600),
  so other users of a shared cluster can read exported weights.
- Readers check the stamp: a folder written by a newer format is refused with the version to install.

`export_model` writes the plain export (model.safetensors + config.yaml + tokenizer/) here, below
the adapters and the trainer that both write exports; reading one back builds a model
(megamem.hf.load.load_exported).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, Optional

import torch

from .config import ConfigError, dump_config

STAMP = "megamem_format.json"
FORMAT_VERSION = 1
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def megamem_version() -> str:
    try:
        from importlib.metadata import version

        return version("megamem")
    except Exception:  # noqa: BLE001 - a source checkout that is not installed
        return "unknown"


def read_stamp(path: str) -> Optional[dict]:
    stamp = os.path.join(path, STAMP)
    if not os.path.isfile(stamp):
        return None
    try:
        with open(stamp, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{stamp}: not readable JSON ({e}); the folder is damaged: write it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{stamp}: expected a JSON object; the folder is damaged: write it again")
    return data


def made_by_megamem(path: str) -> bool:
    """Stamped, or (written before stamps) an export / HF folder of megamem's own layout."""
    if read_stamp(path) is not None:
        return True
    names = set(os.listdir(path))
    if names & {"configuration_megamem.py", "adapter.json"}:
        return True
    return "config.yaml" in names and bool(names & {"model.safetensors", "adapter.safetensors",
                                                    "model.safetensors.index.json"})


def check_format_version(version, where: str, written_by=None) -> None:
    """Refuse a format this megamem does not know: newer than FORMAT_VERSION, or not a version at all."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"{where}: unknown megamem format version {version!r} (this megamem "
                          f"({megamem_version()}) reads formats 1 to {FORMAT_VERSION}); the folder is damaged or "
                          "not megamem's: write it again")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{where} was written by {'megamem ' + str(written_by) if written_by else 'a newer megamem'} "
                          f"in folder format {version}; "
                          f"this megamem ({megamem_version()}) reads format {FORMAT_VERSION}: upgrade megamem")


def check_stamp(path: str) -> Optional[dict]:
    """The folder's stamp (None for folders written before stamps existed); a newer or unknown format is refused."""
    data = read_stamp(path)
    if data is not None:
        check_format_version(data.get("format_version"), path, data.get("megamem_version"))
    return data


def _readable(root: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, names in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in names:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def write_folder(path: str, kind: str, write: Callable[[str], None], replace: bool = True,
                 what: str = "--output") -> str:
    """write(tmp) fills a fresh folder, which then replaces `path` (see the module docstring)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{what} {path} is a file; give a folder")
        if os.listdir(path):
            if not made_by_megamem(path):
                raise ConfigError(f"{what} {path} holds files megamem did not write (no {STAMP}); megamem never "
                                  "deletes such a folder: choose another path, or empty it yourself")
            if not replace:
                raise ConfigError(f"{what} {path} exists and is not empty; pass --force to replace it")
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        with open(os.path.join(tmp, STAMP), "w", encoding="utf-8") as f:
            json.dump({"kind": kind, "format_version": FORMAT_VERSION, "megamem_version": megamem_version()}, f,
                      indent=1)
        _readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def progress(items, desc: str):
    """tqdm over items while a folder is written (off with MEGAMEM_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=os.environ.get("MEGAMEM_NO_PROGRESS") == "1")


def write_text_file(path: str, text: str) -> None:
    """Write one file atomically (beside it, then renamed over it): a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_figure(fig, path: str, dpi: int = 120) -> str:
    """Save a matplotlib figure atomically, in the format its extension names, and close it."""
    import matplotlib.pyplot as plt

    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    fig.savefig(tmp, dpi=dpi, format=ext.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json_file(path: str, obj: Any) -> None:
    """`write_text_file` of obj as indented JSON (values JSON cannot hold are written as their str())."""
    write_text_file(path, json.dumps(obj, indent=1, default=str))


def export_model(state: Dict[str, torch.Tensor], cfg, tokenizer, path: str, step: int,
                 weights_name: str = "model.safetensors", metadata: Optional[Dict[str, Any]] = None,
                 extra_json: Optional[Dict[str, Any]] = None) -> None:
    """Write an export folder into `path.tmp`, then swap it in: a crash never leaves a half-written export.

    extra_json: {file name: JSON-able object} written beside the weights (adapter identity, ...).
    """
    from safetensors.torch import save_file

    def fill(tmp: str) -> None:
        meta = metadata if metadata is not None else {"format": "megamem", "step": step}
        save_file(state, os.path.join(tmp, weights_name), metadata={k: str(v) for k, v in meta.items()})
        for name, obj in (extra_json or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=1)
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(dump_config(cfg))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))

    write_folder(path, "adapter-export" if weights_name != "model.safetensors" else "export", fill, what="export")
