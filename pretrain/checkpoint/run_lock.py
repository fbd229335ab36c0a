"""One training run per checkpoint directory: `<checkpoint.dir>/run.lock`.

Two launches of the same command on one directory would both resume from `latest`, race on each step's temporary
directory and interleave metrics.jsonl; whichever died first took its segment with it. The first launch's rank 0
creates the lock with its host, pid, process start time and SLURM job; a second launch is refused in one line
naming that holder. `pretrain train` takes it before anything writes into the directory (metrics.jsonl's cut on
resume, segments, `latest`): a refused launch changes nothing there.

A lock whose holder is gone is taken over, saying so:
- same host: its pid is not running, or runs another process (the kernel's start time differs: pid reuse);
- the same SLURM job id with a lower restart count (a requeued job, possibly on other nodes: its previous run is
  over by definition);
- another host: its heartbeat is older than STALE_S. The holder refreshes the file's mtime every HEARTBEAT_S from
  a thread, whatever the step is doing (a long save or eval included);
- a record that cannot be read (damaged, or written by something else): only by its heartbeat, like another
  host's, since nothing in it can be asked. The mtime is stat'ed apart from the content, so a live holder's
  unreadable lock is held as long as it is refreshed.

Two mechanisms, for two different questions:
- The JSON record + heartbeat answers "is the holder still alive?". It is needed because the run directory is often
  on a shared file system seen by several hosts: a kernel lock held by a host that died may linger on the server
  (NFS keeps it until the lease of the dead client expires) or not exist at all (file systems mounted without
  lock support), and it cannot name who holds the run. The record can, and a stopped heartbeat ends it.
- An exclusive POSIX lock (fcntl.lockf, honoured over NFS) on `run.lock.guard`, a small file beside it that is
  never deleted, answers "who gets to look and take over now?". It is held only inside `acquire` and `release`,
  for milliseconds, so every check-and-take-over is atomic: of several launches taking over one stale lock
  together, exactly one judges it stale; the others then find the winner's fresh record and are refused. (Without
  it, a launch that judged the stale record could rename the first winner's fresh lock away.) Where the file
  system refuses locks the guard is skipped and the rename protocol below still catches most races; NFS mounted
  `nolock` (and some FUSE file systems) grant such locks per host only, so there the guard orders the launches
  of one host and the re-check covers launches of different hosts.
The record is written to a file of our own and hard-linked into place (a link fails if the name exists: never seen
half-written, one creator wins). A stale lock is renamed away, and what was renamed is compared with what was
judged (inode, mtime, record): if it is something else, it is put back and this launch is refused.
The holder keeps its lock file open: the heartbeat refreshes that file (its inode, not the name), and only while
the name still points at it; `release` unlinks the name only if it still does. A lock taken over by another
launch is therefore never refreshed or deleted by the launch that lost it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pretrain.checkpoint import CheckpointError
from pretrain.run.paths import GUARD_FILE, LOCK_FILE

HEARTBEAT_S = 30.0
STALE_S = 300.0
GUARD_WAIT_S = 60.0  # acquire: the guard is held for milliseconds; this long means a launch hangs inside acquire
RELEASE_WAIT_S = 5.0  # release: a lock left behind is taken over by the next launch (our pid is gone by then)

_threads = threading.Lock()  # POSIX locks belong to a process: the threads of one are serialised here


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

    @staticmethod
    def parse(text: str) -> Holder | None:
        """The record in a lock file; None when it is not one (any key or type amiss)."""
        try:
            holder = Holder(**json.loads(text))
        except (ValueError, TypeError):
            return None
        types = {"host": str, "pid": int, "started": str, "proc_start": str, "slurm_job": (str, type(None)),
                 "slurm_restart": int}
        ok = all(isinstance(getattr(holder, f.name), types[f.name]) for f in fields(Holder))
        return holder if ok and not isinstance(holder.pid, bool) else None

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host} pid {self.pid}{job}, started {self.started}"


@dataclass(frozen=True)
class _Seen:
    """The lock file as judged: its record (None: unreadable), heartbeat age and identity."""
    holder: Holder | None
    age_s: float
    ident: tuple[int, int, int]  # st_dev, st_ino, st_mtime_ns

    def describe(self) -> str:
        return self.holder.describe() if self.holder else f"a holder whose {LOCK_FILE} is unreadable"


def _proc_start(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()[19]


def _gone(seen: _Seen) -> str | None:
    """Why the lock's holder no longer runs, or None when it may still."""
    holder, age_s = seen.holder, seen.age_s
    if holder is None:  # nothing to ask: only the heartbeat tells
        return f"its record is unreadable and its heartbeat stopped {age_s:.0f} s ago" if age_s > STALE_S else None
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


def _ident(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns


@contextmanager
def _guarded(directory: Path, wait_s: float) -> Iterator[None]:
    """Hold the exclusive POSIX lock on `<directory>/run.lock.guard` (see the module docstring); RunLocked when
    another launch keeps it longer than wait_s. A file system without locks: go on unguarded."""
    with _threads:
        fd = os.open(directory / GUARD_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        break  # ENOLCK, EOPNOTSUPP...: no locks here; the rename re-check still applies
                    if time.monotonic() > deadline:
                        raise RunLocked(f"{directory / GUARD_FILE}: another launch has held it for over {wait_s:.0f} "
                                        f"s while taking {directory / LOCK_FILE}; try again, or train into "
                                        f"another checkpoint.dir") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # drops the lock


class RunLock:
    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.me = Holder.me()
        self._fd: int | None = None  # our lock file, open while we hold it: the heartbeat refreshes this inode
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise RunLocked; returns a note when a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _guarded(self.path.parent, GUARD_WAIT_S):
            note = self._take()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        return note

    def release(self) -> None:
        """Unlink the lock if it is still ours (a lock another launch took over stays theirs)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)  # it uses our file descriptor
        if self._fd is None:
            return
        try:
            with _guarded(self.path.parent, RELEASE_WAIT_S):
                if self._ours():
                    self.path.unlink()
        except (RunLocked, OSError):
            pass  # left in place: the next launch finds our pid gone (or our heartbeat stopped) and takes it over
        finally:
            os.close(self._fd)
            self._fd = None

    def _take(self) -> str | None:
        """Under the guard: link our record into place, or judge the one there and take it over if it is stale."""
        mine = self.path.with_name(f".{LOCK_FILE}.{self.me.host}.{self.me.pid}")
        mine.write_text(json.dumps(asdict(self.me)))
        fd = os.open(mine, os.O_RDONLY)
        try:
            note = self._link_or_take_over(mine)
            self._fd, fd = fd, None
            return note
        finally:
            if fd is not None:
                os.close(fd)
            mine.unlink(missing_ok=True)

    def _link_or_take_over(self, mine: Path) -> str | None:
        for _ in range(3):  # the lock may vanish between our link and our look (its holder releasing it)
            try:
                os.link(mine, self.path)
                return None
            except FileExistsError:
                pass
            except OSError as e:  # EPERM, ENOTSUP: object stores mounted through FUSE have no hard links
                raise RunLocked(f"{self.path.parent}: cannot create {LOCK_FILE} ({e.strerror}): the run lock needs "
                                "hard links; put checkpoint.dir on a POSIX file system (local, NFS, Lustre)") from None
            seen = self._look()
            if seen is None:
                continue
            why = _gone(seen)
            if why is None:
                raise RunLocked(self._refusal(seen))
            self._take_over(mine, seen)
            return f"took over {self.path} from {seen.describe()}: {why}"
        raise RunLocked(f"{self.path} keeps appearing and vanishing: another launch is starting on "
                        f"{self.path.parent}; try again")

    def _refusal(self, seen: _Seen) -> str:
        if seen.holder is None:
            return (f"{self.path.parent} is in use by another training run (its {LOCK_FILE} is unreadable but was "
                    f"refreshed {max(seen.age_s, 0):.0f} s ago; taken over once {STALE_S:.0f} s pass without a "
                    f"heartbeat); stop it first, or train into another checkpoint.dir")
        return (f"{self.path.parent} is in use by another training run ({seen.holder.describe()}); "
                f"stop it first, or train into another checkpoint.dir")

    def _take_over(self, mine: Path, seen: _Seen) -> None:
        """Rename the stale lock away, check that it is the one judged (else put it back and refuse), link ours."""
        stale = self.path.with_name(f".{LOCK_FILE}.stale.{self.me.host}.{self.me.pid}")
        taken = f"{self.path.parent} was just taken by another training run"
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            raise RunLocked(f"{taken}; try again") from None
        try:
            moved = os.stat(stale)
            if _ident(moved) != seen.ident or Holder.parse(_read(stale)) != seen.holder:
                try:
                    os.link(stale, self.path)  # someone else's lock: back where it was
                except FileExistsError:
                    pass
                raise RunLocked(f"{taken}; try again")
            try:
                os.link(mine, self.path)
            except FileExistsError:
                raise RunLocked(f"{taken}; try again") from None
        finally:
            stale.unlink(missing_ok=True)

    def _look(self) -> _Seen | None:
        """The lock file now: stat'ed apart from its content, so an unreadable record still has a heartbeat age.
        None: it is gone."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return _Seen(Holder.parse(_read(self.path)), time.time() - st.st_mtime, _ident(st))

    def _ours(self) -> bool:
        """The lock's name still points at the file we linked there."""
        try:
            st, own = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._ours():
                print(f"warning: {self.path} is no longer this run's (another launch took it over or removed it); "
                      f"it is no longer refreshed", file=sys.stderr, flush=True)
                return
            try:
                os.utime(self._fd)  # our inode only: never another holder's file
            except OSError:
                pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""
