"""A preemption notice (SIGUSR1) to tools/progressive.py reaches the running phase's ranks, not its launcher:
the phase checkpoints and exits 75, the tool starts no further phase and exits 75. Real processes: the tool,
a launcher that dies on SIGUSR1 (as DeepSpeed's and torchrun do), scripts/train.py as the rank."""
import os
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from data_utils import make_docs, tokenizer_dir, write_jsonl
from megamem.config import ConfigError
from megamem.parallel.preemption import is_rank
from test_progressive import _tool

PY = sys.executable
TRAIN = os.path.join(ROOT, "scripts", "train.py")
SCHEDULE = ["--model.num_layers", "2", "--memory.memory_layer_placement", "all", "--training.mode", "fused",
            "--training.block_size", "1", "--training.total_blocks", "2", "--training.steps_per_phase", "6",
            "--training.max_length", "32", "--training.batch_size", "2", "--training.logging_steps", "1",
            "--training.eval_steps", "1000", "--training.save_steps", "1000", "--training.warmup_steps", "2"]


def test_ranks_are_the_processes_that_run_train_py_not_their_launchers():
    assert is_rank([PY, TRAIN, "--config", "c.yaml"])
    assert is_rank([PY, "-u", "scripts/train.py", "--local_rank=1", "--config", "c.yaml"])  # DeepSpeed, torchrun
    assert is_rank([PY, "-W", "ignore", TRAIN])
    assert not is_rank([PY, "/venv/bin/deepspeed", "--num_gpus", "2", TRAIN, "--config", "c.yaml"])
    assert not is_rank([PY, "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", TRAIN])
    assert not is_rank([PY, "/venv/bin/torchrun", "--nproc_per_node", "2", TRAIN])
    assert not is_rank(["srun", "--kill-on-bad-exit=0", PY, "-m", "megamem.parallel.slurm", "exec", "--", PY, TRAIN])
    assert not is_rank([PY, "tools/progressive.py", "--config", "c.yaml"])


def test_a_notice_during_a_phase_that_then_finishes_starts_no_further_phase(tmp_path, capsys):
    tool, runs = _tool(), []

    class Runs:  # stands in for the launcher: the notice arrives during phase 0, which still finishes
        noticed = False

        def __call__(self, cmd):
            t = yaml.safe_load(open(cmd[cmd.index("--config") + 1]))["training"]
            runs.append(t["phase"])
            os.makedirs(os.path.join(t["output_dir"], "final"))
            open(os.path.join(t["output_dir"], "final", "model.safetensors"), "w").close()
            self.noticed = True
            return 0

    cfg_path = str(tmp_path / "c.yaml")
    yaml.safe_dump({"model": {"hidden_dim": 32, "num_heads": 4, "num_kv_heads": 2, "num_layers": 2,
                              "intermediate_dim": 48, "vocab_size": 61, "max_seq_len": 64},
                    "training": {"mode": "layerwise", "steps_per_phase": 3, "max_length": 64,
                                 "output_dir": str(tmp_path / "run")}}, open(cfg_path, "w"))
    assert tool.main(["--config", cfg_path], run=Runs()) == 75
    assert runs == [0] and "a preemption notice came before phase 1 started" in capsys.readouterr().err
    assert tool.main(["--config", cfg_path], run=Runs()) == 0  # the rerun goes on with phase 1
    assert runs == [0, 1]


def test_sigusr1_reaches_the_running_phase_through_a_launcher_that_dies_on_it(tmp_path):
    launcher = tmp_path / "launcher.py"  # SIGUSR1 at its default action: signalled, it would die (-10)
    launcher.write_text("import subprocess, sys\nsys.exit(subprocess.run([sys.executable, *sys.argv[1:]]).returncode)\n")
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_docs(60)])
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [PY, os.path.join(ROOT, "tools", "progressive.py"), "--launcher", f"{PY} {launcher}",
         "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), *SCHEDULE, "--model.tokenizer_name",
         tokenizer_dir(), f"--data.datasets=[{{path: {data}, eval_path: {data}}}]", "--training.output_dir", str(out)],
        cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MEGAMEM_NO_PROGRESS": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("training: 1 rank"):  # phase 0's rank is up: the notice goes to the tool
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, "".join(lines)
    log = "".join(lines)
    assert "stopped early on a preemption signal; checkpoint saved" in log and "phase 0 was preempted" in log
    step = int((out / "phase_0" / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 1 <= step < 6 and (out / "phase_0" / "checkpoints" / f"step{step:08d}" / "COMPLETE").is_file()
    assert not (out / "phase_0" / "final").exists() and not (out / "phase_1").exists()


def test_check_phases_refuses_a_phase_before_launching_it_with_one_line_naming_its_config(tmp_path):
    """--check-phases (slurm/common.sh passes it): scripts/train.py --check on the phase's config first."""
    tool, runs = _tool(), []
    out = tmp_path / "run"
    cfg_path = str(tmp_path / "c.yaml")
    yaml.safe_dump({"model": {"hidden_dim": 32, "num_heads": 4, "num_kv_heads": 2, "num_layers": 2,
                              "intermediate_dim": 48, "vocab_size": 61, "max_seq_len": 64,
                              "tokenizer_name": str(tmp_path / "no-tokenizer")},
                    "training": {"mode": "layerwise", "steps_per_phase": 3, "max_length": 64, "output_dir": str(out)}},
                   open(cfg_path, "w"))
    with pytest.raises(ConfigError) as refused:
        tool.main(["--config", cfg_path, "--check-phases"], run=runs.append)
    assert str(refused.value).startswith(f"{out}/phase_0.yaml: ") and "no-tokenizer" in str(refused.value)
    assert "\n" not in str(refused.value) and runs == []  # nothing was launched
