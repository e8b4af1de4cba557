"""What a failed run leaves behind: removed. A full disk: one line naming the path.

``removed_on_failure(dir, ...)`` wraps a job. On any exception (also ``KeyboardInterrupt``) it removes
the entries of each directory that the run created — those absent when the block started — and only
those: what was there before (the published index, an earlier run's results) is never touched, nor any
entry ``keep(name)`` names (the index passes the folders its current manifest references, so a run that
fails *after* publishing keeps what it published). A directory that did not exist before is removed
whole. Then the exception propagates, except that running out of disk space (``OSError`` ENOSPC, or a
runner's error whose text says "No space left on device") becomes ``DiskFullError``: a ``ValueError``,
which the command line reports as one line with exit status 2::

    with removed_on_failure(index_dir, keep=lambda name: name in referenced(index_dir)):
        run_the_job()

A SIGKILL cannot be caught: the next run of the same job removes what a killed one left (the index
does so in ``publish``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import Callable, Iterator

NO_SPACE = "No space left on device"
_PATH_IN_TEXT = re.compile(r"No space left on device:? *'([^']+)'")


class DiskFullError(ValueError):
    """The disk (or quota) was full while a run wrote ``path``; the run's partial output was removed."""

    def __init__(self, path: str, removed: list[str]):
        self.path, self.removed = path, removed
        what = f"removed what the failed run wrote ({len(removed)} entries)" if removed else "nothing was left to remove"
        super().__init__(f"no space left on device writing {path}: {what}; free some space (or write elsewhere) "
                         "and run again")


def disk_full_path(exc: BaseException) -> str | None:
    """The path being written when ``exc`` (or an exception it was raised from) ran out of space; '' when the
    text says so without a path; None when ``exc`` is not about a full disk."""
    seen: set[int] = set()
    e: BaseException | None = exc
    found: str | None = None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return str(e.filename) if e.filename else ""
        text = str(e)
        if NO_SPACE in text or "[Errno 28]" in text:
            m = _PATH_IN_TEXT.search(text)
            found = m.group(1) if m else (found or "")
        e = e.__cause__ or e.__context__
    return found


def _entries(directory: str) -> set[str] | None:
    """The names directly in ``directory``; None when it does not exist."""
    if "://" not in directory:
        try:
            return set(os.listdir(directory))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return set()
    from apache_beam.io.filesystems import FileSystems

    found = FileSystems.match([directory.rstrip("/") + "/**"])[0].metadata_list
    if not found:
        return None
    start = len(directory.rstrip("/")) + 1
    return {m.path[start:].split("/", 1)[0] for m in found}


def _remove_new(directory: str, before: set[str] | None, keep: Callable[[str], bool]) -> list[str]:
    from beam_influence.audit.state import remove_tree

    now = _entries(directory)
    if now is None:
        return []
    new = sorted(n for n in now - (before or set()) if not keep(n))
    if before is None and len(new) == len(now):  # the run created the directory: remove it whole
        remove_tree(directory)
        return [directory]
    removed = []
    for name in new:
        path = f"{directory.rstrip('/')}/{name}"
        try:
            remove_tree(path)
            removed.append(path)
        except Exception:  # noqa: BLE001 - best effort: the original error matters more
            pass
    return removed


@contextlib.contextmanager
def removed_on_failure(*directories: str, keep: Callable[[str], bool] = lambda name: False) -> Iterator[None]:
    """Remove what the block created in ``directories`` if it raises (see the module doc); a full disk
    becomes ``DiskFullError`` naming the path (or the first directory when the error names none)."""
    dirs = [d for d in directories if d]
    before = {d: _entries(d) for d in dirs}
    try:
        yield
    except BaseException as e:
        removed: list[str] = []
        for d in dirs:
            try:
                removed += _remove_new(d, before[d], keep)
            except Exception:  # noqa: BLE001
                pass
        path = disk_full_path(e)
        if path is not None and isinstance(e, Exception):
            raise DiskFullError(path or (dirs[0] if dirs else "?"), removed) from e
        raise
