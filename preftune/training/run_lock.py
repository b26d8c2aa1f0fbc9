"""One run per output directory: ``output_dir/.preftune.lock`` holds the host and pid of the run using it.

A second ``preftune train`` on the directory refuses with ``RunLockError`` naming the other process. A
lock whose process is gone (same host, pid no longer running, or reused by a process started later) is
taken over with a warning; this process's own lock (an earlier run in the same process) silently. A lock
from another host cannot be checked: the user removes it once that run is known to be dead.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from preftune.errors import RunLockError
from preftune.modeling.parallel import DistInfo, any_rank
from preftune.run_dir import RunDir


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces


def is_running(pid: int, start: int | None) -> bool:
    """Whether ``pid`` is a live process started at ``start`` (when known) on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """The lock of ``output_dir`` (``acquire`` takes it, ``release`` drops it; also at interpreter exit)."""

    def __init__(self, output_dir: str | Path):
        self.path = RunDir(output_dir).lock
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }

    def acquire(self) -> RunLock:
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            atexit.register(self.release)
            return self

    def _take_over_if_stale(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return  # released meanwhile
        try:
            other = json.loads(text)
            host, pid, start = other["host"], int(other["pid"]), other.get("start")
        except (ValueError, KeyError, TypeError):
            other, host, pid, start = {}, None, None, None
        mine = host == self.owner["host"] and pid == self.owner["pid"]
        if host == self.owner["host"] and pid is not None and not mine and is_running(pid, start):
            raise RunLockError(
                f"{self.path.parent} is in use by another preftune run (pid {pid} on {host}, since "
                f"{other.get('since', '?')}); wait for it to finish, stop it, or choose another output_dir"
            )
        if host is not None and host != self.owner["host"]:
            raise RunLockError(
                f"{self.path.parent} is in use by a preftune run on host {host} (pid {pid}, since "
                f"{other.get('since', '?')}); if that run is dead, delete {self.path}"
            )
        if not mine:
            print(
                f"[preftune] warning: taking over {self.path} left by "
                f"{f'pid {pid}, no longer running' if pid is not None else 'an unreadable lock'}",
                file=sys.stderr,
                flush=True,
            )
        # move it aside, and put it back if what was moved is a lock another process took meanwhile
        aside = self.path.with_name(f"{self.path.name}.stale{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != text:
            os.replace(aside, self.path)
            return
        aside.unlink()

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text())["pid"] == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError, KeyError):
            pass
        atexit.unregister(self.release)


def lock_output_dir(output_dir: Path, info: DistInfo) -> RunLock:
    """Rank 0 takes ``output_dir``'s lock; every rank raises ``RunLockError`` if it is refused."""
    lock = RunLock(output_dir)
    error = None
    if info.is_main:
        try:
            lock.acquire()
        except RunLockError as e:
            error = e
    if any_rank(error is not None, info):
        raise error or RunLockError(f"{output_dir} is in use by another preftune run (see rank 0)")
    return lock
