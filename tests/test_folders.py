"""Folder writes: atomic swaps, a stamp of format and version, readable files, never over foreign data."""
import json
import os
import stat

import pytest
import torch

from megamem.config import ConfigError
from megamem.folders import FORMAT_VERSION, STAMP, export_model, write_folder
from megamem.hf.convert import convert_to_hf
from megamem.hf.load import load_exported
from megamem.model import build_model

from conftest import tiny_config


def _export(path, seed=0):
    cfg = tiny_config()
    torch.manual_seed(seed)
    model = build_model(cfg)
    export_model(model.state_dict(), cfg, None, str(path), seed)
    return model


def test_export_is_stamped_readable_and_replaced_whole(tmp_path):
    first = _export(tmp_path / "final", seed=0)
    stamp = json.loads((tmp_path / "final" / STAMP).read_text())
    assert stamp["kind"] == "export" and stamp["format_version"] == FORMAT_VERSION and stamp["megamem_version"]
    mode = stat.S_IMODE(os.stat(tmp_path / "final" / "model.safetensors").st_mode)
    assert mode & 0o044 == 0o044  # group and others may read (safetensors alone writes 0600)
    second = _export(tmp_path / "final", seed=1)  # a re-export replaces the first, nothing left beside it
    assert sorted(os.listdir(tmp_path)) == ["final"]
    loaded, _, _ = load_exported(str(tmp_path / "final"))
    assert torch.equal(loaded.tok_embeddings.weight, second.tok_embeddings.weight)
    assert not torch.equal(loaded.tok_embeddings.weight, first.tok_embeddings.weight)


def test_a_crash_while_writing_keeps_the_old_folder(tmp_path):
    _export(tmp_path / "final", seed=0)
    before = (tmp_path / "final" / "model.safetensors").read_bytes()

    def dies(tmp):
        open(os.path.join(tmp, "model.safetensors"), "wb").write(b"half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_folder(str(tmp_path / "final"), "export", dies)
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["final"]  # the partial folder is gone too


def test_foreign_folders_are_never_deleted(tmp_path, monkeypatch):
    _export(tmp_path / "final")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for target in (mine, tmp_path):
        with pytest.raises(ConfigError, match="holds files megamem did not write .* megamem never deletes"):
            convert_to_hf(str(tmp_path / "final"), str(target), force=True)
    monkeypatch.chdir(mine)
    with pytest.raises(ConfigError, match="megamem did not write"):
        convert_to_hf(str(tmp_path / "final"), ".", force=True)  # --output . --force
    assert (mine / "thesis.tex").read_text() == "years of work"
    out = convert_to_hf(str(tmp_path / "final"), str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="exists and is not empty; pass --force"):
        convert_to_hf(str(tmp_path / "final"), out)
    convert_to_hf(str(tmp_path / "final"), out, force=True)  # its own folder: replaced
    assert json.loads(open(os.path.join(out, STAMP)).read())["kind"] == "hf"


def test_a_newer_format_is_refused(tmp_path):
    _export(tmp_path / "final")
    stamp = tmp_path / "final" / STAMP
    stamp.write_text(json.dumps({"kind": "export", "format_version": FORMAT_VERSION + 1, "megamem_version": "9.0"}))
    with pytest.raises(ConfigError, match=r"written by megamem 9.0 in folder format 2; .* upgrade megamem"):
        load_exported(str(tmp_path / "final"))
