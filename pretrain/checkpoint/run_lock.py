"""One training run per checkpoint directory: `<checkpoint.dir>/run.lock`.

Two launches of the same command on one directory would both resume from `latest`, race on each step's temporary
directory and interleave metrics.jsonl; whichever died first took its segment with it. The first launch's rank 0
creates the lock (O_EXCL, so exactly one creator wins) with its host, pid, process start time and SLURM job; a
second launch is refused in one line naming that holder.

A lock whose holder is gone is taken over, saying so:
- same host: its pid is not running, or runs another process (the kernel's start time differs: pid reuse);
- the same SLURM job id with a lower restart count (a requeued job, possibly on other nodes: its previous run is
  over by definition);
- another host: its heartbeat is older than STALE_S. The holder refreshes the file's mtime every HEARTBEAT_S from
  a thread, whatever the step is doing (a long save or eval included).
The record is linked into place (never seen half-written), and a stale lock is renamed away before the new one
is linked: of two launches taking over at once, one fails and is refused.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.checkpoint import CheckpointError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLocked(CheckpointError):
    """Another live launch holds the checkpoint directory (one-line message naming it)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # wall-clock start, for people
    proc_start: str  # the kernel's start time of pid (/proc/<pid>/stat field 22), to tell pid reuse apart
    slurm_job: str | None
    slurm_restart: int = 0  # SLURM_RESTART_COUNT: a requeued job keeps its id and counts up

    @staticmethod
    def me() -> Holder:
        return Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"),
                      _proc_start(os.getpid()) or "", os.environ.get("SLURM_JOB_ID"),
                      int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host} pid {self.pid}{job}, started {self.started}"


def _proc_start(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()[19]


def _gone(holder: Holder, age_s: float) -> str | None:
    """Why `holder` no longer runs, or None when it may still."""
    me = Holder.me()
    if holder.slurm_job and holder.slurm_job == me.slurm_job and holder.slurm_restart < me.slurm_restart:
        return f"it was SLURM job {holder.slurm_job}'s previous run (requeued)"
    if holder.host == me.host:
        start = _proc_start(holder.pid)
        if start is None:
            return f"pid {holder.pid} is not running"
        if holder.proc_start and start != holder.proc_start:
            return f"pid {holder.pid} is now another process"
        return None
    if age_s > STALE_S:
        return f"its heartbeat stopped {age_s:.0f} s ago"
    return None


class RunLock:
    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.me = Holder.me()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise RunLocked; returns a note when a stale lock was taken over.

        The record is written to a file of our own and hard-linked into place: a link fails if the name exists,
        so the lock file is never seen empty or half-written and exactly one creator wins. A stale lock is first
        renamed away (of two launches renaming it, one fails), then linked as above."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f".{LOCK_FILE}.{self.me.host}.{self.me.pid}")
        mine.write_text(json.dumps(asdict(self.me)))
        note = None
        try:
            try:
                os.link(mine, self.path)
            except FileExistsError:
                holder, age = self._read()
                why = "its record is unreadable" if holder is None else _gone(holder, age)
                if why is None:
                    raise RunLocked(f"{self.path.parent} is in use by another training run ({holder.describe()}); "
                                    f"stop it first, or train into another checkpoint.dir") from None
                stale = self.path.with_name(f".{LOCK_FILE}.stale.{self.me.host}.{self.me.pid}")
                try:
                    os.rename(self.path, stale)
                    os.link(mine, self.path)
                except (FileNotFoundError, FileExistsError):  # another launch took it over first
                    holder = self._read()[0]
                    raise RunLocked(f"{self.path.parent} was just taken by another training run "
                                    f"({holder.describe() if holder else 'unknown'})") from None
                stale.unlink(missing_ok=True)
                note = f"took over {self.path} from {holder.describe() if holder else 'an unknown holder'}: {why}"
        finally:
            mine.unlink(missing_ok=True)
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        return note

    def release(self) -> None:
        self._stop.set()
        if self._read()[0] == self.me:
            self.path.unlink(missing_ok=True)

    def _read(self) -> tuple[Holder | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            return Holder(**json.loads(self.path.read_text())), age
        except (OSError, ValueError, TypeError):
            return None, 0.0

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
