"""A stop signal that lands after the work is done (the final checkpoint committed, `done:` printed, the processes
tearing down) leaves the exit code 0: nothing is lost and nothing needs a requeue. CPython restores the default
handlers while the interpreter shuts down, and SIGUSR1's and SIGTERM's default is to die: such a notice used to kill
the ranks (`launch: ranks exited with [-10]`, the job FAILED).

Real ranks under `python -m launch`, 2 processes; from the `done:` line on, every process of the run gets the signal
every few milliseconds until all have exited."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from spawn import REPO, child_env
from train_common import tiny_shards, train_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                text = open(f"/proc/{stat}/stat").read()
            except OSError:
                continue
            children.setdefault(int(text[text.rfind(")") + 2:].split()[1]), []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_after_done_leaves_exit_0(tmp_path_factory, sig):
    data = tiny_shards(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("run") / "run"
    args = train_args(data / "shards", run, "train.max_steps=4", "parallel.zero_stage=1")[2:]  # drop "-m pretrain"
    proc = subprocess.Popen([sys.executable, "-m", "launch", "--nproc-per-node", "2", "--", "-m", "pretrain", *args],
                            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent, lines = [0], []

    def blast() -> None:  # every process of the run, until the launcher has exited
        while proc.poll() is None:
            for pid in _tree(proc.pid)[1:]:  # the ranks (and anything they started), not the launcher
                try:
                    os.kill(pid, sig)
                    sent[0] += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    shooter = None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("done: step 4") and shooter is None:
            shooter = threading.Thread(target=blast)
            shooter.start()
    proc.wait(timeout=120)
    if shooter:
        shooter.join()
    out = "".join(lines)
    assert shooter is not None, out[-3000:]
    assert sent[0] > 0, "no signal landed before the ranks exited"
    assert proc.returncode == 0, f"exit {proc.returncode} after {sent[0]} signals\n{out[-3000:]}"
