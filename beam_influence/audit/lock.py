"""One audit at a time per ``audit_root``: an exclusive lock file ``<audit_root>/audit.lock``.

The lock is a small JSON file (pid, host, process start time, start time, a random token) created
with ``O_CREAT | O_EXCL``, so of two runs that start together exactly one gets it; the other stops
with ``AuditLockedError`` naming the file and its holder. The holder removes it when it ends (also on
an exception). A run killed with SIGKILL leaves its lock behind: a later run *on the same host* sees
that the pid is gone (or now belongs to another process: the start time differs) and takes the lock
over with a warning. A lock from another host cannot be checked and is never taken over: delete it
yourself when you know that no audit is running there.

Taking over is serialised by ``fcntl.flock`` on ``audit.lock.guard`` and re-reads the lock under it,
so two runs that both find the same stale lock cannot both end up holding a lock. On an object store
(``gs://``) there is no exclusive create: the lock is written and read back (best effort; a scheduler
that prevents overlapping runs remains the first line of defence there).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid

from beam_influence.util import read_text, write_text

LOCK_NAME = "audit.lock"
GUARD_NAME = "audit.lock.guard"
UNREADABLE_GRACE_S = 60.0  # an empty/garbled lock older than this is a creator killed mid-write


class AuditLockedError(RuntimeError):
    """Another audit holds the lock of this ``audit_root`` (the message names the lock file)."""


def _proc_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (Linux ``/proc``), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    except OSError:
        return False
    if start is not None:  # the pid may have been reused by another process since
        now = _proc_start(pid)
        if now is not None and now != start:
            return False
    return True


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "an unknown time"


class AuditLock:
    """``with AuditLock(audit_root) as lock: ...`` (``lock.recovered``: the stale holder taken over, or None)."""

    def __init__(self, audit_root: str):
        self.root = audit_root.rstrip("/")
        self.remote = "://" in self.root
        self.path = f"{self.root}/{LOCK_NAME}"
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.recovered: dict | None = None
        self.held = False

    # ------------------------------------------------------------------ public
    def __enter__(self) -> "AuditLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": self.host, "proc_start": _proc_start(os.getpid()),
                "started_at": time.time(), "started_at_utc": _when(time.time()), "token": self.token}

    def acquire(self) -> "AuditLock":
        (self._acquire_remote if self.remote else self._acquire_local)()
        self.held = True
        return self

    def release(self) -> None:
        """Remove the lock if it is still ours (never someone else's)."""
        if not self.held:
            return
        self.held = False
        holder, _ = self._read()
        if holder is None or holder.get("token") != self.token:
            print(f"audit: warning: the lock {self.path} is no longer ours at the end of the run; left as is",
                  file=sys.stderr)
            return
        try:
            if self.remote:
                from apache_beam.io.filesystems import FileSystems

                FileSystems.delete([self.path])
            else:
                os.remove(self.path)
        except (OSError, FileNotFoundError):
            pass
        except Exception:  # noqa: BLE001 - an object store error: the lock stays, the next run reports it
            print(f"audit: warning: could not remove the lock {self.path}", file=sys.stderr)

    # ------------------------------------------------------------------ internals
    def _read(self) -> tuple[dict | None, str | None]:
        """(parsed holder or None when garbled, raw text or None when there is no lock file)."""
        if self.remote:
            from beam_influence.util import exists

            if not exists(self.path):
                return None, None
            try:
                raw = read_text(self.path)
            except FileNotFoundError:
                if not exists(self.path):
                    return None, None
                raise
        else:
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return None, raw
        return (holder if isinstance(holder, dict) else None), raw

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # created but never written: its creator died between open and write
            try:
                age = time.time() - os.path.getmtime(self.path) if not self.remote else UNREADABLE_GRACE_S + 1
            except OSError:
                return False
            return age > UNREADABLE_GRACE_S
        if holder.get("host") != self.host or not isinstance(holder.get("pid"), int):
            return False  # another machine's process: cannot be checked from here
        return not _pid_alive(holder["pid"], holder.get("proc_start"))

    def _held_error(self, holder: dict | None) -> AuditLockedError:
        if holder is None:
            who = "a run that is just starting (the lock file is empty or garbled)"
        else:
            who = (f"pid {holder.get('pid')} on host {holder.get('host')} since "
                   f"{holder.get('started_at_utc') or _when(holder.get('started_at'))}")
        return AuditLockedError(
            f"another audit is running on this audit_root: the lock {self.path} is held by {who}. "
            f"Wait for it to finish; if no audit is running there, delete {self.path}")

    def _warn_takeover(self, holder: dict | None) -> None:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
               f"{holder.get('started_at_utc') or _when(holder.get('started_at'))}"
               if holder else "an empty or garbled lock file")
        print(f"audit: warning: taking over the stale lock {self.path} ({who}): that process is gone "
              "(killed?); its unfinished work is resumed", file=sys.stderr, flush=True)
        self.recovered = holder or {"garbled": True}

    def _acquire_local(self) -> None:
        import fcntl

        from beam_influence.audit.config import AuditConfigError

        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise AuditConfigError(f"audit_root {self.root!r} is a file, not a directory: point audit_root at a "
                                   "directory (it is created if missing) where the audit keeps its state")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:  # a parent is a file, no permission, ...
            raise AuditConfigError(f"audit_root {self.root!r} cannot be created as a directory: "
                                   f"{e.strerror or e}") from None
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, raw = self._read()
                if raw is None:
                    continue  # released in the meantime: try again
                if not self._stale(holder):
                    raise self._held_error(holder) from None
                with open(os.path.join(self.root, GUARD_NAME), "a") as guard:
                    fcntl.flock(guard, fcntl.LOCK_EX)
                    try:
                        _, again = self._read()
                        if again == raw:  # still the stale lock we judged (not a fresh one of another taker)
                            os.remove(self.path)
                            self._warn_takeover(holder)
                    finally:
                        fcntl.flock(guard, fcntl.LOCK_UN)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.info(), indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return
        raise AuditLockedError(f"could not take the lock {self.path}: it keeps changing hands")

    def _acquire_remote(self) -> None:
        holder, raw = self._read()
        if raw is not None:
            if not self._stale(holder):
                raise self._held_error(holder)
            self._warn_takeover(holder)
        write_text(self.path, json.dumps(self.info(), indent=2) + "\n")
        time.sleep(1.0)  # let a concurrent writer's object land before reading back
        mine, _ = self._read()
        if mine is None or mine.get("token") != self.token:
            raise self._held_error(mine)
