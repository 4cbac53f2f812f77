"""Every folder megamem writes records its format version; every reader refuses a newer or unknown one
with one line (exit 2 in the scripts) instead of loading something it may misread."""
import importlib.util
import json
import os

import pytest
import torch

from megamem.cli import run_cli
from megamem.config import ConfigError
from megamem.eval import load_any
from megamem.folders import FORMAT_VERSION, STAMP, export_model
from megamem.hf.convert import convert_to_hf
from megamem.hf.load import load_exported
from megamem.model import build_model
from megamem.train.init_from import init_from

from conftest import ROOT, tiny_config

NEWER = f"was written by megamem 9.0 in folder format {FORMAT_VERSION + 1}; .* upgrade megamem"


def _stamp(folder, version):
    (folder / STAMP).write_text(json.dumps({"kind": "export", "format_version": version, "megamem_version": "9.0"}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    cfg, vanilla = tiny_config(), tiny_config("memory.vanilla_mode=true")
    export_model(build_model(cfg).state_dict(), cfg, None, str(d / "final"), 1)
    export_model(build_model(vanilla).state_dict(), vanilla, None, str(d / "vanilla"), 1)
    convert_to_hf(str(d / "final"), str(d / "hf"))
    convert_to_hf(str(d / "vanilla"), str(d / "llama"))
    return d


def test_every_folder_kind_records_the_format(folders):
    for name, kind in (("final", "export"), ("hf", "hf"), ("llama", "hf")):
        stamp = json.loads((folders / name / STAMP).read_text())
        assert stamp["kind"] == kind and stamp["format_version"] == FORMAT_VERSION
    assert json.loads((folders / "hf" / "config.json").read_text())["megamem_format_version"] == FORMAT_VERSION
    assert json.loads((folders / "llama" / "config.json").read_text())["model_type"] == "llama"


def test_current_folders_load(folders):
    model, _, _ = load_exported(str(folders / "final"))
    for name in ("final", "hf", "llama"):
        loaded = load_any(str(folders / name))
        with torch.no_grad():
            assert loaded.hf(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 61)


@pytest.mark.parametrize("version,message", [(FORMAT_VERSION + 1, NEWER), ("2.0-beta", "unknown megamem format version '2.0-beta'"),
                                             (0, "unknown megamem format version 0"), (None, "unknown megamem format version None")])
def test_a_newer_or_unknown_stamp_is_refused_by_every_reader(folders, tmp_path, version, message):
    for name in ("final", "hf", "llama"):
        copy = tmp_path / name
        os.makedirs(copy)
        for item in os.listdir(folders / name):
            os.link(folders / name / item, copy / item)
        os.remove(copy / STAMP)
        _stamp(copy, version)
        with pytest.raises(ConfigError, match=message):
            load_any(str(copy))
    with pytest.raises(ConfigError, match=message):
        load_exported(str(tmp_path / "final"))
    with pytest.raises(ConfigError, match=message):
        load_exported(str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=message):
        convert_to_hf(str(tmp_path / "final"), str(tmp_path / "out"))
    cfg = tiny_config(f"training.init_from={tmp_path / 'final'}")
    with pytest.raises(ConfigError, match=message):
        init_from(build_model(cfg), cfg, 0)


def test_an_adapter_export_of_a_newer_format_is_refused_before_its_base_is_read(tmp_path):
    from megamem.adapter import load_adapter

    (tmp_path / "adapter.json").write_text(json.dumps({"format": "megamem-adapter", "base_model_name": "nowhere"}))
    _stamp(tmp_path, FORMAT_VERSION + 1)
    with pytest.raises(ConfigError, match=NEWER):
        load_adapter(str(tmp_path))
    with pytest.raises(ConfigError, match=NEWER):
        load_exported(str(tmp_path))


def test_transformers_refuse_a_newer_megamem_config(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    import megamem  # noqa: F401 - registers model_type megamem

    copy = tmp_path / "hf"
    os.makedirs(copy)
    for item in os.listdir(folders / "hf"):
        os.link(folders / "hf" / item, copy / item)
    os.remove(copy / "config.json")
    data = json.loads((folders / "hf" / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**data, "megamem_format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ConfigError, match=rf"^config.json was written by a newer megamem in folder format "
                                          rf"{FORMAT_VERSION + 1}; .* upgrade megamem$"):
        AutoModelForCausalLM.from_pretrained(str(copy))


def test_the_scripts_exit_2_with_one_line(folders, tmp_path, capsys):
    copy = tmp_path / "final"
    os.makedirs(copy)
    for item in os.listdir(folders / "final"):
        os.link(folders / "final" / item, copy / item)
    os.remove(copy / STAMP)
    _stamp(copy, FORMAT_VERSION + 1)
    spec = importlib.util.spec_from_file_location("convert_to_hf", os.path.join(ROOT, "tools", "convert_to_hf.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert run_cli(lambda: cli.main(["--checkpoint", str(copy), "--output", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upgrade megamem" in err
