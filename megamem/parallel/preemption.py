"""A preemption notice (SIGUSR1) passed from a parent process to the ranks of the run it launched.

tools/progressive.py starts each phase with a launcher (`python`, `srun ...`, `deepspeed ...`, `torchrun ...`)
and, preempted itself, must pass the notice on to the phase's ranks (scripts/train.py: checkpoint after the
step, exit 75) without killing the launcher: DeepSpeed's launchers and torchrun die on SIGUSR1 (its default
action), while srun forwards it to every task (tasks that are not our descendants). So a notice goes to srun
itself, else to every process at or below the launched one that runs scripts/train.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import List, Sequence

import psutil

RANK_SCRIPT = os.path.join("scripts", "train.py")
_VALUE_OPTIONS = ("-W", "-X")  # python options whose value is the next argument


def is_rank(cmdline: Sequence[str]) -> bool:
    """Whether a command line runs scripts/train.py as its program (`python [-u] .../scripts/train.py ...`).
    Launchers that name it as an argument (`python .../deepspeed --num_gpus 2 scripts/train.py`,
    `python -m deepspeed.launcher.launch ... scripts/train.py`, `srun ... scripts/train.py`) are not ranks."""
    args = iter(cmdline[1:])
    for arg in args:
        if arg in ("-m", "-c"):
            return False
        if arg in _VALUE_OPTIONS:
            next(args, None)
        elif not arg.startswith("-"):
            return arg.endswith(RANK_SCRIPT)
    return False


def notice_targets(pid: int) -> List[psutil.Process]:
    """Who gets a notice meant for the run launched as `pid`: srun itself, else the ranks at or below it."""
    try:
        top = psutil.Process(pid)
        if os.path.basename(top.cmdline()[0]) == "srun":
            return [top]
        tree = [top, *top.children(recursive=True)]
    except (psutil.Error, IndexError):  # gone, or a zombie waiting to be reaped
        return []
    targets = []
    for proc in tree:
        try:
            if is_rank(proc.cmdline()):
                targets.append(proc)
        except psutil.Error:
            continue
    return targets


class LaunchedRuns:
    """Runs launcher commands one at a time (`runs(cmd)` → exit code). Installs a SIGUSR1 handler: the notice
    is remembered (`noticed`, so no further run need start) and forwarded to the running command's ranks,
    then again every `resend_s` until the command exits (a rank still starting up may miss the first)."""

    def __init__(self, resend_s: float = 15.0):
        self.noticed = False
        self.resend_s = resend_s
        self._pid = None
        signal.signal(signal.SIGUSR1, self._notice)

    def _notice(self, *_) -> None:
        self.noticed = True
        self.forward()

    def forward(self) -> None:
        if self._pid is None:
            return
        for proc in notice_targets(self._pid):
            try:
                proc.send_signal(signal.SIGUSR1)
            except psutil.Error:
                continue

    def __call__(self, cmd: Sequence[str]) -> int:
        proc = subprocess.Popen(list(cmd))
        self._pid = proc.pid
        try:
            while True:
                try:
                    return proc.wait(timeout=self.resend_s)
                except subprocess.TimeoutExpired:
                    if self.noticed:
                        self.forward()
        finally:
            self._pid = None
