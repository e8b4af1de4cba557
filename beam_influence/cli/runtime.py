"""What every command does before its work: quiet the known noise, a persistent XLA compilation cache, and a
line per phase with its time (``phase``), so no command is silent for minutes."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

CACHE_ENV = "BEAM_INFLUENCE_COMPILATION_CACHE"


class UserError(ValueError):
    """A mistake the user can fix (bad flag value, missing file, mismatched inputs): exit 2, one line."""

    catch: tuple = ()  # filled below: every exception class the CLI reports as a user error


def _user_errors() -> tuple:
    errors: list = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                    TypeError]
    try:  # the audit's own usage errors and lock (all ValueError / OSError subclasses, listed for clarity)
        from beam_influence.audit.lock import AuditLockedError

        errors.append(AuditLockedError)
    except ImportError:  # pragma: no cover
        pass
    from beam_influence.beam.cleanup import DiskFullError  # a full disk: one line naming the path

    errors.append(DiskFullError)
    return tuple(errors)


def default_cache_dir() -> str:
    """``$BEAM_INFLUENCE_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/beam-influence/jax`` (~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "beam-influence", "jax")


def use_compilation_cache(path: str | None) -> str | None:
    """Persist XLA executables under ``path`` (None: the default directory) for this process and, through the
    environment, for the Beam worker processes it starts; the second job on the same model and shapes loads
    its executables instead of compiling them. Returns the directory, or None when it cannot be created."""
    path = os.path.abspath(os.path.expanduser(path or default_cache_dir()))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"note: no compilation cache ({path}: {e.strerror}); every job compiles from scratch",
              file=sys.stderr)
        return None
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "jax" in sys.modules:  # already imported (tests, the demo): set the live config too
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    return path


def apply_compilation_options(opts) -> str | None:
    """The cache a job's ``CompilationOptions`` ask for (``--no_compilation_cache``: none)."""
    if not getattr(opts, "compilation_cache", False):
        return None
    return use_compilation_cache(getattr(opts, "compilation_cache_dir", None))


def prepare_process() -> None:
    """Once per command: silence the known third-party noise at its source (nothing else is hidden)."""
    try:
        from beam_influence.logs import quiet_known_noise
    except ImportError:  # the noise filters land in their own module
        return
    quiet_known_noise()


@contextlib.contextmanager
def phase(what: str, *, out=None) -> Iterator[None]:
    """Print ``what …`` now and ``what: done in Xs`` after, so long steps (loading, XLA compilation) show."""
    out = out or sys.stdout
    print(f"… {what}", file=out, flush=True)
    t0 = time.time()
    yield
    print(f"  {what}: done in {time.time() - t0:.1f}s", file=out, flush=True)


UserError.catch = _user_errors()

__all__ = ["CACHE_ENV", "UserError", "apply_compilation_options", "default_cache_dir", "phase", "prepare_process",
           "use_compilation_cache"]
