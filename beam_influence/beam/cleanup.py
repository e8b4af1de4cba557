"""What a failed run leaves behind: removed. A full disk: one line naming the path.

``removed_on_failure(dir, ...)`` wraps a job. On any exception (also ``KeyboardInterrupt``) it removes
the entries of each directory that the run created — those absent when the block started — and only
those: what was there before (the published index, an earlier run's results) is never touched, nor any
entry ``keep(name)`` names (the index passes ``index.kept_on_failure``: the folders its current manifest
references, so a run that fails *after* publishing keeps what it published, and anything an index job does
not write). A directory that did not exist before is removed whole. Then the exception propagates, except that running out of disk space (``OSError`` ENOSPC, or a
runner's error whose text says "No space left on device") becomes ``DiskFullError``: a ``ValueError``,
which the command line reports as one line with exit status 2::

    with removed_on_failure(index_dir, keep=kept_on_failure(index_dir)):
        run_the_job()

A SIGKILL cannot be caught: the next run of the same job removes what a killed one left (the index
does so in ``publish``, a result folder in ``staged``).

Jobs whose results have fixed names (``topk.jsonl``, ``summary.json``, ...) overwrite the previous run's
files; ``staged(output)`` makes that safe: the job writes into a fresh ``<output>/.partial-<run>/`` and
only when it finished are the files moved over their namesakes (each move atomic, the summaries last).
A failed run removes its staging folder and leaves the previous results (and anything else in ``output``)
as they were; a successful one also removes the staging folders of killed runs (two runs writing into one
output folder at once are not supported)::

    with staged(output) as out_dir:
        run_the_job(out_dir)
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import uuid
from typing import Callable, Iterator

NO_SPACE = "No space left on device"
STAGE_PREFIX = ".partial-"  # a result folder's staging folders (``staged``)
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
        path = None if isinstance(e, DiskFullError) else disk_full_path(e)  # an inner block's: as it is
        if path is not None and isinstance(e, Exception):
            raise DiskFullError(path or (dirs[0] if dirs else "?"), removed) from e
        raise


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def _replace(src: str, dst: str) -> None:
    if "://" not in dst:
        os.replace(src, dst)
        return
    from apache_beam.io.filesystems import FileSystems

    if FileSystems.exists(dst):  # object stores: rename = copy, which refuses to overwrite on some
        FileSystems.delete([dst])
    FileSystems.rename([src], [dst])


def _files(directory: str) -> list[str]:
    """The names of the files directly in ``directory`` (not of folders)."""
    if "://" not in directory:
        return sorted(n for n in (_entries(directory) or set()) if os.path.isfile(os.path.join(directory, n)))
    from apache_beam.io.filesystems import FileSystems

    start = len(directory.rstrip("/")) + 1
    found = FileSystems.match([_join(directory, "*")])[0].metadata_list
    return sorted(m.path[start:] for m in found if "/" not in m.path[start:])


def publish_stage(stage: str, output: str) -> list[str]:
    """Move every file directly in ``stage`` over its namesake in ``output`` (``*summary.json`` last, so a
    summary never describes results that are not there yet), then remove ``stage`` and the staging folders
    that killed runs left. Returns the published names."""
    from beam_influence.audit.state import remove_tree

    names = _files(stage)
    for name in sorted(names, key=lambda n: (n.endswith("summary.json"), n)):
        _replace(_join(stage, name), _join(output, name))
    remove_tree(stage)
    own = stage.rstrip("/").rsplit("/", 1)[-1]
    for name in sorted(_entries(output) or set()):
        if name.startswith(STAGE_PREFIX) and name != own:
            try:
                remove_tree(_join(output, name))
            except Exception:  # noqa: BLE001 - a leftover staging folder is harmless
                pass
    return names


@contextlib.contextmanager
def staged(output: str) -> Iterator[str]:
    """Yield a fresh staging folder ``<output>/.partial-<UTC>-<random>`` for a job's results (its path: the
    folder is made by the first write into it, so a job's checks of ``output`` may run inside); when the block
    ends normally its files replace their namesakes in ``output`` (``publish_stage``); when it raises, what
    the block created in ``output`` is removed and a full disk becomes ``DiskFullError``
    (``removed_on_failure``): the previous results are never touched by a failed run."""
    output = output.rstrip("/")
    stage = _join(output, f"{STAGE_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}")
    name = stage.rsplit("/", 1)[-1]  # only the stage is the job's (``output`` may be shared: never touch the rest)
    with removed_on_failure(output, keep=lambda entry: entry != name):  # from before the job's own checks,
        # which may create ``output`` (then removed too, if nothing else appeared in it)
        yield stage  # created by the first write into it (Beam's FileSystems and core.files make parents)
        publish_stage(stage, output)
