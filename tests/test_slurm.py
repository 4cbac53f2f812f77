"""SLURM launchers: rank mapping from SLURM/MPI variables, preemption exit code, and end-to-end runs of
slurm/pretrain.sh on a real one-node SLURM cluster (tools/slurm_cluster.sh starts it; `pytest -m slurm`):
a run, a preempted and requeued run, and a progressive schedule preempted inside a phase."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from safetensors.torch import load_file

from conftest import ROOT
from megamem.parallel.slurm import hostfile, mpi_env, rendezvous, task_env, tasks_per_node

PY = sys.executable
TINY = ["--training.max_steps", "6", "--training.max_length", "32", "--training.batch_size", "2",
        "--training.logging_steps", "1", "--training.eval_steps", "1000", "--training.eval_max_batches", "2",
        "--training.save_steps", "1000", "--training.warmup_steps", "2"]
JOB_TIMEOUT_S = 300  # a safety net against a hung job, not a measurement
# a 2-phase fused schedule: phase 0 trains a 1-layer model, phase 1 stacks layer 1 on it (docs/progressive.md)
SCHEDULE = ["--model.num_layers", "2", "--memory.memory_layer_placement", "all", "--training.mode", "fused",
            "--training.block_size", "1", "--training.total_blocks", "2", "--training.steps_per_phase", "6"]


# ---------------------------------------------------------------- rank mapping (no cluster needed)
def fake_task(procid, nodes=2, per_node=4, job_id="4242"):
    node, local = divmod(procid, per_node)
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
            "SLURM_NTASKS": str(nodes * per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_ID": job_id}


def test_tasks_per_node_reads_compressed_counts():
    assert tasks_per_node("4(x2)") == [4, 4]
    assert tasks_per_node("8(x3),2") == [8, 8, 8, 2]
    assert tasks_per_node("1") == [1]
    with pytest.raises(ValueError, match="cannot read"):
        tasks_per_node("4(2)")


def test_two_nodes_by_four_tasks_map_to_distinct_ranks():
    envs = [task_env(fake_task(p)) for p in range(8)]
    assert [e["RANK"] for e in envs] == [str(r) for r in range(8)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"] * 2
    assert [e["NODE_RANK"] for e in envs] == ["0"] * 4 + ["1"] * 4
    assert {e["WORLD_SIZE"] for e in envs} == {"8"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"4"}
    assert {e["NNODES"] for e in envs} == {"2"}


def test_step_variables_win_and_uneven_nodes_get_their_own_local_size():
    env = {**fake_task(9, nodes=3, per_node=4), "SLURM_STEP_TASKS_PER_NODE": "4,4,2", "SLURM_STEP_NUM_TASKS": "10",
           "SLURM_NODEID": "2", "SLURM_LOCALID": "1"}
    mapped = task_env(env)
    assert (mapped["RANK"], mapped["LOCAL_RANK"], mapped["WORLD_SIZE"], mapped["LOCAL_WORLD_SIZE"]) == ("9", "1", "10", "2")


def test_missing_slurm_variables_are_named():
    env = fake_task(0)
    del env["SLURM_PROCID"]
    with pytest.raises(KeyError, match="SLURM_PROCID is not set"):
        task_env(env)


def test_rendezvous_is_the_first_host_and_a_port_every_task_agrees_on():
    hosts = ["gpu-017", "gpu-018"]
    every = {tuple(sorted(rendezvous(fake_task(p), hosts).items())) for p in range(8)}
    assert every == {(("MASTER_ADDR", "gpu-017"), ("MASTER_PORT", str(20000 + 4242)))}
    assert rendezvous({"SLURM_JOB_ID": "123456"}, hosts)["MASTER_PORT"] == str(20000 + 123456 % 20000)
    preset = rendezvous({"SLURM_JOB_ID": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}, hosts)
    assert preset == {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}


def test_deepspeed_hostfile_lists_every_host_with_its_slots():
    assert hostfile(["n1", "n2"], 8) == "n1 slots=8\nn2 slots=8\n"


class FakeComm:
    """mpi4py's COMM_WORLD for rank `rank` of 2 nodes × 4 processes."""

    def __init__(self, rank, size=8, per_node=4):
        self.rank, self.size, self.per_node = rank, size, per_node

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind):
        return FakeComm(self.rank % self.per_node, self.per_node, self.per_node)

    def bcast(self, value, root=0):
        return "node0" if root == 0 else value


def test_mpi_discovery_maps_world_and_node_local_ranks():
    mapped = [mpi_env(FakeComm(r), f"node{r // 4}", shared_type=0) for r in range(8)]
    assert [m["RANK"] for m in mapped] == [str(r) for r in range(8)]
    assert [m["LOCAL_RANK"] for m in mapped] == ["0", "1", "2", "3"] * 2
    assert {m["MASTER_ADDR"] for m in mapped} == {"node0"} and {m["WORLD_SIZE"] for m in mapped} == {"8"}


def test_exec_sets_the_rank_environment_and_survives_an_early_usr1():
    code = ("import os, signal; os.kill(os.getpid(), signal.SIGUSR1); "
            "print(os.environ['RANK'], os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'], os.environ['LOCAL_WORLD_SIZE'])")
    env = {**os.environ, **fake_task(6)}
    out = subprocess.run([PY, "-m", "megamem.parallel.slurm", "exec", "--", PY, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "2", "8", "4"]


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/nope.yaml"], "error: config file not found: configs/nope.yaml"),
    (["--config", "configs/tiny_cpu.yaml", "--training.max_stepz", "3"], "error: override --training.max_stepz: unknown key 'training.max_stepz'"),
    (["--config", "configs/tiny_cpu.yaml", "--deepspeed", "ds_configs/zero9.json"],
     "error: DeepSpeed config not found: ds_configs/zero9.json"),
])
def test_prepare_refuses_bad_input_with_one_line(tmp_path, args, message):
    out = subprocess.run([PY, "-m", "megamem.parallel.slurm", "prepare", "1", *args,
                          "--training.output_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(message)
    assert not (tmp_path / "o").exists()


def test_batch_script_outside_slurm_says_how_to_submit():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", "slurm/pretrain.sh", "configs/tiny_cpu.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: not inside a SLURM job; submit with: sbatch")


# ---------------------------------------------------------------- data for real runs
@pytest.fixture(scope="module")
def kjv():
    """The embedded corpus and its tokenizer, where configs/tiny_cpu.yaml expects them (seconds, once)."""
    subprocess.run([PY, "tools/prepare_corpus.py"], cwd=ROOT, check=True, capture_output=True)
    if not os.path.isfile(os.path.join(ROOT, "data/tokenizers/kjv-4096/tokenizer.json")):
        subprocess.run([PY, "tools/train_tokenizer.py", "--input", "data/corpus/kjv/train.jsonl", "--out",
                        "data/tokenizers/kjv-4096"], cwd=ROOT, check=True, capture_output=True)


def train_losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    evals = [r["eval_loss"] for r in records if r["kind"] == "eval"]
    return train, evals


def test_preemption_signal_checkpoints_and_exits_75(kjv, tmp_path):
    """scripts/train.py alone, one process: USR1 after start-up → checkpoint at a step boundary, exit 75."""
    out_dir = tmp_path / "run"
    proc = subprocess.Popen([PY, "scripts/train.py", "--config", "configs/tiny_cpu.yaml", *TINY,
                             "--training.output_dir", str(out_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "MEGAMEM_NO_PROGRESS": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("training: 1 rank"):
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait() == 75, "".join(lines)
    step = int((out_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 1 <= step < 6
    assert (out_dir / "checkpoints" / f"step{step:08d}" / "COMPLETE").is_file()
    assert sorted(train_losses(out_dir)[0]) == list(range(1, step + 1))
    assert not (out_dir / "final").exists()
    assert any("stopped early on a preemption signal" in line for line in lines)


# ---------------------------------------------------------------- a real SLURM cluster
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start the one-node cluster (installing slurm-wlm and munge if needed); stop it afterwards by pid."""
    state = os.environ.get("MEGAMEM_SLURM_DIR", "/tmp/megamem-slurm")
    was_running = os.path.isfile(os.path.join(state, "slurmctld.pid")) and subprocess.run(
        ["bash", "-c", f"kill -0 $(cat {state}/slurmctld.pid)"], capture_output=True).returncode == 0
    start = subprocess.run(["bash", "tools/slurm_cluster.sh", "start"], cwd=ROOT, capture_output=True, text=True)
    if start.returncode == 3:  # no root or no apt-get: SLURM cannot be installed here
        pytest.skip(f"no SLURM cluster ({start.stderr.strip()}); tools/slurm_cluster.sh start installs and starts one as root")
    assert start.returncode == 0, start.stderr
    env = {**os.environ, "SLURM_CONF": os.path.join(state, "slurm.conf"), "MEGAMEM_PYTHON": PY}
    env.pop("MEGAMEM_ROOT", None)
    yield {"env": env, "logs": tmp_path_factory.mktemp("slurm-logs")}
    if not was_running:
        subprocess.run(["bash", "tools/slurm_cluster.sh", "stop"], cwd=ROOT, check=True)


def submit(slurm, *args, sbatch=()):
    out = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1",
                          f"--output={slurm['logs']}/%j.out", *sbatch, "slurm/pretrain.sh", *args], cwd=ROOT,
                         env=slurm["env"], capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_info(slurm, job):
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm["env"], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for_job(slurm, job, until=lambda: False):
    """Poll until the job has ended for good (a requeued job goes back to PENDING, not to an end state)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = job_info(slurm, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if until():
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=slurm["env"])
    pytest.fail(f"job {job} did not end within {JOB_TIMEOUT_S} s:\n{job_output(slurm, job)}")


def job_output(slurm, job):
    path = os.path.join(slurm["logs"], f"{job}.out")
    return open(path, encoding="utf-8").read() if os.path.isfile(path) else "(no output)"


@pytest.fixture(scope="module")
def unbroken(slurm, kjv, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("unbroken") / "run")
    job = submit(slurm, "configs/tiny_cpu.yaml", "--deepspeed", "ds_configs/zero1.json", *TINY,
                 "--training.output_dir", out_dir)
    return job, wait_for_job(slurm, job), out_dir


@pytest.mark.slurm
def test_sbatch_pretrain_trains_logs_and_does_not_requeue(slurm, unbroken):
    job, info, out_dir = unbroken
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", job_output(slurm, job)
    train, evals = train_losses(out_dir)
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and train[6] < train[1] and len(evals) == 1
    assert open(f"{out_dir}/checkpoints/latest").read() == "step00000006"
    assert os.path.isfile(f"{out_dir}/final/model.safetensors")
    run_dir = f"{out_dir}/slurm/{job}"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert open(f"{run_dir}/git.txt").readline().strip() == f"commit: {head or 'unknown'}"
    assert "max_steps: 6" in open(f"{run_dir}/config.yaml").read()
    log = open(f"{run_dir}/job.log").read()
    assert "2 ranks on localhost" in log and "training: 2 ranks" in log and "training exited with code 0" in log
    history = open(f"{out_dir}/slurm/history.txt").read()
    assert history.count(" start ") == 1 and "preempted" not in history and f"exit job={job} restart=0 code=0" in history


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes_like_an_unbroken_run(slurm, unbroken, tmp_path):
    out_dir = str(tmp_path / "run")
    job = submit(slurm, "configs/tiny_cpu.yaml", "--deepspeed", "ds_configs/zero1.json", *TINY,
                 "--training.output_dir", out_dir)
    log_path = f"{out_dir}/slurm/{job}/job.log"

    def ranks_started():
        return os.path.isfile(log_path) and "training: 2 ranks" in open(log_path).read()

    wait_for_job(slurm, job, until=ranks_started)  # rank 0 honours USR1 from this line on
    assert ranks_started(), job_output(slurm, job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm["env"], check=True)
    info = wait_for_job(slurm, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_output(slurm, job)

    history = open(f"{out_dir}/slurm/history.txt").read()
    assert f"preempted job={job} restart=0" in history and f"exit job={job} restart=1 code=0" in history
    first = re.search(r"resuming from .*/checkpoints/step(\d+)", open(log_path).read())
    assert first, open(log_path).read()
    stopped_at = int(first.group(1))
    assert 1 <= stopped_at < 6  # the first run stopped early, with a checkpoint
    assert os.path.isfile(f"{out_dir}/checkpoints/step{stopped_at:08d}/COMPLETE")
    assert open(f"{out_dir}/checkpoints/latest").read() == "step00000006"
    assert os.path.isfile(f"{out_dir}/final/model.safetensors")

    train, evals = train_losses(out_dir)
    want_train, want_evals = train_losses(unbroken[2])
    assert sorted(train) == [1, 2, 3, 4, 5, 6]  # every step logged once: none lost, none repeated
    assert [train[s] for s in range(1, 7)] == pytest.approx([want_train[s] for s in range(1, 7)], abs=1e-6, rel=0)
    assert evals == pytest.approx(want_evals, abs=1e-6, rel=0)


@pytest.mark.slurm
def test_sbatch_with_a_bad_config_fails_with_one_error_line(slurm, tmp_path):
    job = submit(slurm, "configs/missing.yaml", "--training.output_dir", str(tmp_path / "run"))
    info = wait_for_job(slurm, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0"
    assert job_output(slurm, job).strip() == "error: config file not found: configs/missing.yaml"
    assert not (tmp_path / "run").exists()


@pytest.mark.slurm
def test_a_progressive_schedule_preempted_in_phase_1_requeues_and_ends_like_an_unbroken_one(slurm, kjv, tmp_path):
    """sbatch slurm/pretrain.sh with training.mode fused runs tools/progressive.py; USR1 during phase 1 reaches
    its 2 srun ranks (checkpoint, exit 75), the job requeues, skips phase 0 and resumes phase 1. The exports
    equal those of tools/progressive.py run directly, unbroken, on 2 ranks (torchrun)."""
    args = ["configs/tiny_cpu.yaml", "--deepspeed", "ds_configs/zero1.json", *TINY, *SCHEDULE]
    out_dir = str(tmp_path / "run")
    job = submit(slurm, *args, "--training.output_dir", out_dir)
    log_path = f"{out_dir}/slurm/{job}/job.log"

    def phase_1_started():  # rank 0 of phase 1 honours USR1 from this line on
        return os.path.isfile(log_path) and f"training: 2 ranks, output {out_dir}/phase_1" in open(log_path).read()

    wait_for_job(slurm, job, until=phase_1_started)
    assert phase_1_started(), job_output(slurm, job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm["env"], check=True)
    info = wait_for_job(slurm, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_output(slurm, job)

    log = open(log_path).read()
    history = open(f"{out_dir}/slurm/history.txt").read()
    assert f"preempted job={job} restart=0" in history and f"exit job={job} restart=1 code=0" in history
    first, again = log.split(f"job {job} restart 1: ", 1)
    assert "phase 1 was preempted" in first and "phase 0: finished" not in first
    assert f"phase 0: finished ({out_dir}/phase_0/final), skipped" in again
    assert f"phase 1: layers 1-1 of 2, resuming → {out_dir}/phase_1" in again
    assert again.count("checks passed") == 1 and "progressive: ran phases [1]" in again
    stopped_at = min(int(t.removeprefix("step")) for t in os.listdir(f"{out_dir}/phase_1/checkpoints")
                     if t.startswith("step"))
    assert 1 <= stopped_at < 6  # the first attempt stopped phase 1 early, with a checkpoint
    assert sorted(train_losses(f"{out_dir}/phase_1")[0]) == [1, 2, 3, 4, 5, 6]  # no step lost or repeated
    assert "max_steps: 6" in open(f"{out_dir}/phase_1.yaml").read()
    assert "mode: fused" in open(f"{out_dir}/slurm/{job}/config.yaml").read()

    ref = str(tmp_path / "unbroken")
    torchrun = f"{os.path.dirname(PY)}/torchrun --standalone --nproc_per_node 2"
    done = subprocess.run([PY, "tools/progressive.py", "--launcher", torchrun, *args[1:], "--config", args[0],
                           "--training.output_dir", ref], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MEGAMEM_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for p in (0, 1):
        got, want = (load_file(f"{d}/phase_{p}/final/model.safetensors") for d in (out_dir, ref))
        assert got.keys() == want.keys()
        worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
        assert worst <= 1e-6, (p, worst)
    train, want_train = train_losses(f"{out_dir}/phase_1")[0], train_losses(f"{ref}/phase_1")[0]
    assert [train[s] for s in range(1, 7)] == pytest.approx([want_train[s] for s in range(1, 7)], abs=1e-6, rel=0)
