"""Whole-file reads and writes for the core's artefacts (checkpoints, eigensystem files).

Local paths use Python's own file objects, so the core never imports Beam. Paths with a scheme
(``gs://``, ``s3://``, ...) go through Beam's ``FileSystems``, imported only for them.
"""
from __future__ import annotations

import os


def _remote(path: str) -> bool:
    return "://" in path


def read_bytes(path: str) -> bytes:
    """The bytes of ``path``; ``FileNotFoundError`` naming it when it cannot be opened."""
    try:
        if _remote(path):
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(path) as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} does not exist") from None
    except OSError as e:
        raise FileNotFoundError(f"cannot read {path!r}: {e}") from None


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically for local files (temporary file, then rename)."""
    if _remote(path):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(path) as f:
            f.write(data)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
