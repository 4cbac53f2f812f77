"""The README and the guides in docs/ stay true: links resolve, shown configs dry-run, shown commands parse.

- every relative link (and image) in README.md and docs/*.md points to an existing file, and a
  `#anchor` to a heading of that file;
- every `configs/*.yaml` named anywhere in them exists and `scripts/train.py --config <it> --dry-run`
  exits 0 and prints the parameter counts (an adapter config whose base model is neither a local
  folder nor in the Hugging Face cache prints the documented "not counted" note instead); every
  shown training command (scripts/train.py under any launcher, slurm/*.sh CONFIG ...) dry-runs at
  the world size its launcher starts, and every shown scripts/eval.py config loads with its overrides;
- every `scripts/...`, `tools/...`, `slurm/...`, `configs/...`, `ds_configs/...` path in a code
  block exists, and every `--flag` shown after a script in a command (code blocks and inline
  command spans) is accepted by that script's parser; a dotted override `--section.key` names a
  real config key;
- docs/configuration.md lists every key of the config schema.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

from megamem.config import ConfigError, load_config
from megamem.config.schema import SECTIONS

from conftest import ROOT

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
DOC_IDS = [os.path.relpath(p, ROOT) for p in DOCS]

FENCE = re.compile(r"^(\s*)(```|~~~)(.*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|tools|slurm|configs|ds_configs)/[\w./-]*\w)")
CONFIG_PATH = re.compile(r"(?<![\w./-])(configs/[\w.-]+\.yaml)")
# commands start with one of these (after VAR=value assignments); a script path may also start one
LAUNCHERS = {"python", "python3", ".venv/bin/python", "deepspeed", "torchrun", "bash", "sbatch", "mpirun", "srun"}
SCRIPT = re.compile(r"^(scripts/\w+\.py|tools/\w+\.py|tools/\w+\.sh|slurm/\w+\.sh)$")
# scripts whose unknown --section.key arguments are config overrides
TAKES_OVERRIDES = {"scripts/train.py", "scripts/eval.py", "tools/ablate.py", "tools/compare_adapters.py", "tools/progressive.py",
                   "tools/bench_progressive.py", "tools/bench_recall.py",
                   "slurm/pretrain.sh",
                   "slurm/adapter.sh"}
# the sbatch scripts pass everything after the config to scripts/train.py
PARSER_OF = {"slurm/pretrain.sh": "scripts/train.py", "slurm/adapter.sh": "scripts/train.py"}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def split_markdown(text):
    """(prose with code blocks blanked out, [(language, code) for each fenced block])."""
    prose, blocks, block, lang = [], [], None, None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if block is None and m:
            block, lang = [], m.group(3).strip()
            prose.append("")
        elif block is not None and m and not m.group(3).strip():
            blocks.append((lang, "\n".join(block)))
            block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert block is None, "unclosed code block"
    return "\n".join(prose), blocks


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    prose, _ = split_markdown(read(path))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M)}


def commands(path):
    """Shell commands shown in a document: lines of bash code blocks and inline command spans."""
    prose, blocks = split_markdown(read(path))
    found = []
    for lang, code in blocks:
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        found += code.replace("\\\n", " ").split("\n")
    found += [" ".join(m.group(2).split()) for m in INLINE.finditer(prose)]
    out = []
    for line in found:
        words = line.split()
        while words and re.match(r"^[A-Z_]+=\S*$", words[0]):  # VAR=value before the command
            words = words[1:]
        if not words or not (words[0] in LAUNCHERS or (SCRIPT.match(words[0]) and len(words) > 1)):
            continue  # not a command (a path alone in prose is a name, not a command)
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as e:  # pragma: no cover - a doc typo
            raise AssertionError(f"{os.path.relpath(path, ROOT)}: cannot parse command {line!r}: {e}")
        if tokens:
            out.append(tokens)
    return out


def script_calls(path):
    """(script, [arguments after it]) for every shown command that runs a script of this repository."""
    calls = []
    for tokens in commands(path):
        for i, tok in enumerate(tokens):
            if SCRIPT.match(tok):
                calls.append((tok, tokens[i + 1:], tokens))
                break
    return calls


@functools.lru_cache(maxsize=None)
def accepted_flags(script):
    """The --flags a script's parser accepts, read from its --help."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-2000:]}"
    return set(re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", proc.stdout))


def config_keys(nested: bool = False):
    """(section, key) of every config key; nested=True names a nested section's keys (pos_encoding.type)."""
    keys = set()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if nested and dataclasses.is_dataclass(sub):
                keys |= {(section, f"{f.name}.{g.name}") for g in dataclasses.fields(sub)}
            else:
                keys.add((section, f.name))
    return keys


# ---------------------------------------------------------------------------------------------- links

@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_relative_links_resolve(path):
    prose, _ = split_markdown(read(path))
    bad = []
    for m in LINK.finditer(prose):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            bad.append(f"{target}: {os.path.relpath(dest, ROOT)} does not exist")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not bad, f"{os.path.relpath(path, ROOT)}:\n" + "\n".join(bad)


def test_readme_links_every_guide():
    prose, _ = split_markdown(read(DOCS[0]))
    linked = {os.path.normpath(m.group(1).partition("#")[0]) for m in LINK.finditer(prose)}
    missing = [os.path.relpath(p, ROOT) for p in DOCS[1:] if os.path.relpath(p, ROOT) not in linked]
    assert not missing, f"README.md does not link {missing}"


# ---------------------------------------------------------------------------------------------- configs

def named_configs():
    return sorted({m.group(1) for p in DOCS for m in CONFIG_PATH.finditer(read(p))})


def import_script(name):
    """scripts/<name>.py imported in-process (main(argv) and parse_args(argv) are its CLI).

    scripts/train.py installs a SIGUSR1 handler at import; the test process keeps its own.
    """
    old = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    spec = importlib.util.spec_from_file_location(f"megamem_script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        if old is not None:
            signal.signal(signal.SIGUSR1, old)
    return module


@pytest.fixture(scope="module")
def train_script():
    return import_script("train")


def dry_run(train_script, argv, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # documented commands are run from the checkout
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    rc = train_script.main(argv)
    return rc, capsys.readouterr().out


def base_available(cfg):
    """Whether the adapter's base config is local (a folder or the HF cache): the dry run never downloads."""
    from megamem.adapter.base import base_config

    try:  # called inside a test that already runs from ROOT, as the dry run did
        base_config(cfg.model.base_model_name, local_only=True)
        return True
    except ConfigError:
        return False


def assert_counts(out, cfg, where):
    assert "# resolved config" in out and "# parameters" in out, f"{where}: no dry-run report:\n{out}"
    if cfg.model.base_model_name is not None and not base_available(cfg):
        assert "not counted:" in out and "a dry run does not download" in out, f"{where}:\n{out}"
        return
    for key in ("total", "memory", "trainable"):
        assert re.search(rf"^{key}:\s+[\d,]+\s+\(", out, re.M), f"{where}: no {key} count:\n{out}"


def test_docs_name_configs():
    assert "configs/tiny_cpu.yaml" in named_configs()


@pytest.mark.parametrize("config", named_configs())
def test_named_config_exists_and_dry_runs(config, train_script, capsys, monkeypatch):
    assert os.path.isfile(os.path.join(ROOT, config)), f"{config} is named in the docs but does not exist"
    rc, out = dry_run(train_script, ["--config", config, "--dry-run"], capsys, monkeypatch)
    assert rc == 0
    assert_counts(out, load_config(os.path.join(ROOT, config)), config)


def documented_dry_runs():
    runs = []
    for path in DOCS:
        for script, args, tokens in script_calls(path):
            if script == "scripts/train.py" and "--dry-run" in args and "..." not in args:
                runs.append(pytest.param(args, id=f"{os.path.relpath(path, ROOT)}: {' '.join(args)}"))
    return runs


@pytest.mark.parametrize("args", documented_dry_runs())
def test_documented_dry_run_commands_run_as_written(args, train_script, capsys, monkeypatch):
    rc, out = dry_run(train_script, list(args), capsys, monkeypatch)
    assert rc == 0
    config = args[args.index("--config") + 1]
    assert_counts(out, load_config(os.path.join(ROOT, config)), " ".join(args))


def launch_world(tokens):
    """The number of ranks a shown launch starts (deepspeed --num_gpus, torchrun --nproc_per_node,
    sbatch --nodes x --ntasks-per-node, mpirun -np; 1 otherwise)."""
    def value(*names, default=1):
        for i, tok in enumerate(tokens):
            for name in names:
                if tok == name and i + 1 < len(tokens):
                    return int(tokens[i + 1])
                if tok.startswith(name + "="):
                    return int(tok.split("=", 1)[1])
        return default

    if tokens[0] == "sbatch":
        return value("--nodes", "-N") * value("--ntasks-per-node")
    return value("--num_gpus", "--nproc_per_node", "-np")


def documented_config_commands():
    """Shown commands that name a config: scripts/train.py, scripts/eval.py --config, slurm/*.sh CONFIG."""
    runs = []
    for path in DOCS:
        for script, args, tokens in script_calls(path):
            if "..." in args:
                continue
            if script in PARSER_OF and args and args[0].endswith(".yaml"):
                script, args = PARSER_OF[script], ["--config", *args]
            if script == "scripts/train.py" or (script == "scripts/eval.py" and "--config" in args):
                runs.append(pytest.param(script, args, launch_world(tokens),
                                         id=f"{os.path.relpath(path, ROOT)}: {' '.join(tokens)}"))
    return runs


@pytest.mark.parametrize("script,args,world", documented_config_commands())
def test_documented_commands_pass_their_checks(script, args, world, train_script, capsys, monkeypatch):
    """Every shown training command dry-runs at the world size its launcher starts (config, overrides,
    DeepSpeed JSON and layout all pass); every shown evaluation config loads with its overrides."""
    monkeypatch.chdir(ROOT)
    if script == "scripts/train.py":
        argv = list(args) if "--dry-run" in args else [*args, "--dry-run"]
        monkeypatch.setenv("WORLD_SIZE", str(world))
        capsys.readouterr()
        assert train_script.main(argv) == 0
        assert f"world size {world}," in capsys.readouterr().out
    else:
        parsed, overrides = import_script("eval").parse_args(list(args))
        load_config(parsed.config, overrides)


# ---------------------------------------------------------------------------------------------- commands

@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_paths_in_code_blocks_exist(path):
    _, blocks = split_markdown(read(path))
    missing = sorted({m.group(1) for _, code in blocks for m in REPO_PATH.finditer(code)
                      if not os.path.exists(os.path.join(ROOT, m.group(1)))})
    for script, _, _ in script_calls(path):  # inline command spans too
        if not os.path.exists(os.path.join(ROOT, script)):
            missing.append(script)
    assert not missing, f"{os.path.relpath(path, ROOT)} shows paths that do not exist: {missing}"


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_shown_flags_are_accepted(path):
    keys = config_keys()
    bad = []
    for script, args, tokens in script_calls(path):
        if not script.endswith(".py") and script not in PARSER_OF:
            continue  # shell tools (run_tests.sh passes its arguments to pytest)
        parser = PARSER_OF.get(script, script)
        for arg in args:
            if not arg.startswith("--"):
                continue
            name = arg.split("=", 1)[0]
            if "." in name:
                section, _, key = name[2:].partition(".")
                if (section, key) not in keys:
                    bad.append(f"{script} {name}: no config key {section}.{key}")
                elif script not in TAKES_OVERRIDES:
                    bad.append(f"{script} {name}: this script takes no config overrides")
            elif name not in accepted_flags(parser):
                bad.append(f"{script} {name}: not an option of {parser}")
    assert not bad, f"{os.path.relpath(path, ROOT)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_dotted_overrides_name_real_keys(path):
    keys = config_keys()
    named = set(re.findall(r"(?<![\w-])--(model|memory|training|parallel|data)\.(\w+)", read(path)))
    assert not named - keys, f"{os.path.relpath(path, ROOT)}: no such config keys: {sorted(named - keys)}"


def test_configuration_reference_lists_every_key():
    text = read(os.path.join(ROOT, "docs", "configuration.md"))
    sections = re.split(r"^### `(\w+):`\s*$", text, flags=re.M)
    tables = dict(zip(sections[1::2], sections[2::2]))
    assert set(tables) == set(SECTIONS), f"docs/configuration.md key reference sections: {sorted(tables)}"
    missing = [f"{section}.{key}" for section, key in sorted(config_keys(nested=True))
               if not re.search(rf"^\| `{key}` \| `[^`]*` \| \S", tables[section], re.M)]
    assert not missing, f"docs/configuration.md lists no default and meaning for {missing}"
