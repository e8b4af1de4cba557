"""Checkpoint interop: load a ModelSpec's params from the files JAX users already have.

Forms read (none of them uses pickle):

* **orbax** — a checkpoint directory written by ``orbax.checkpoint`` (``StandardCheckpointer`` /
  ``PyTreeCheckpointer``; a ``CheckpointManager`` root, whose latest step is read; a step folder of
  named items, e.g. ``state/``, seen as ``{item: tree}``). Only the params subtree is read from disk
  (orbax partial restore), after its structure, shapes and dtypes were checked from the metadata.
* **safetensors** — a flat map of tensors whose names are the params' key paths joined by ``/`` or ``.``
  (``Dense_0/kernel``, ``params.Dense_0.kernel``).
* **msgpack** — ``flax.serialization`` bytes of bare params, of ``{"params": …}``, or of a whole
  ``TrainState`` (``serialization.to_bytes(state)``: ``{"step", "params", "opt_state"}``).

The params subtree is selected by a key path (``params_key="state/params"``; on the command line a
suffix ``ckpt.msgpack#state/params``) or, when none is given, found automatically: the shallowest
subtree whose keys are exactly the spec's (one named ``params`` wins a tie, e.g. over an optimiser's
``mu``/``nu``, which have the same structure but sit deeper anyway). Every problem is a
``CheckpointError`` (a ``ValueError``) naming the file, the form detected and what was expected.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from beam_influence.core.files import read_bytes, write_bytes
from beam_influence.core.types import Params

FORMS = ("orbax", "safetensors", "msgpack")
_FORM_WORDS = {"orbax": "orbax checkpoint directory", "safetensors": "safetensors file", "msgpack": "msgpack file"}
_MAX_KEYS_SHOWN = 12


class CheckpointError(ValueError):
    """A checkpoint cannot be read into the spec's params (wrong form, structure, shape, dtype or values)."""


# ---- paths ---------------------------------------------------------------------------------------
def split_params_key(path: str) -> tuple[str, str | None]:
    """``"ckpt.msgpack#state/params"`` → ``("ckpt.msgpack", "state/params")``; no ``#`` → ``(path, None)``.

    A local file whose own name contains ``#`` is taken as it is."""
    if "#" not in path or os.path.exists(path):
        return path, None
    base, key = path.rsplit("#", 1)
    return base, (key.strip("/") or None)


def _remote(path: str) -> bool:
    return "://" in path


def _is_dir(path: str) -> bool:
    if not _remote(path):
        return os.path.isdir(path)
    from etils import epath  # an orbax dependency; knows gs:// and s3://

    return epath.Path(path).is_dir()


def detect_form(path: str) -> str:
    """The checkpoint form of ``path`` (one of ``FORMS``): a directory is orbax; a file by its extension
    (``.safetensors``, ``.msgpack``), else by its first bytes (a safetensors header is a little-endian
    length followed by a JSON object)."""
    path = split_params_key(path)[0]
    if _is_dir(path):
        return "orbax"
    low = path.lower()
    if low.endswith((".safetensors", ".st")):
        return "safetensors"
    if low.endswith((".msgpack", ".mpk", ".flax")):
        return "msgpack"
    head = read_bytes(path)[:9]
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    return "msgpack"


def checkpoint_state(path: str) -> Any:
    """A cheap, hashable token that changes when the checkpoint at ``path`` changes (for caches):
    (size, mtime) of a file, of every file under an orbax directory; None for remote paths."""
    path = split_params_key(path)[0]
    if _remote(path):
        return None
    try:
        if not os.path.isdir(path):
            st = os.stat(path)
            return (st.st_size, st.st_mtime_ns)
        out = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                out.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
        return tuple(out)
    except OSError:
        return None


# ---- trees ---------------------------------------------------------------------------------------
def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", None) if hasattr(leaf, "shape") else np.shape(leaf))


def _dtype(leaf: Any) -> np.dtype:
    dt = getattr(leaf, "dtype", None)
    return np.dtype(dt) if dt is not None else np.asarray(leaf).dtype


def _is_node(x: Any) -> bool:
    return isinstance(x, Mapping)


def _join(where: tuple[str, ...]) -> str:
    return "/".join(where)


def _leaf(name: str) -> str:
    """A parameter named both ways: ``'Dense_0/kernel' (['Dense_0']['kernel'])`` (key path, jax keystr)."""
    return f"{name!r} (" + "".join(f"[{k!r}]" for k in name.split("/")) + ")"


def _show_keys(node: Mapping) -> str:
    keys = sorted(map(str, node))
    more = f", … ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return "[" + ", ".join(repr(k) for k in keys[:_MAX_KEYS_SHOWN]) + more + "]"


def _same_keys(got: Any, want: Any, shapes: bool = False) -> bool:
    """Same nested key structure (dict vs leaf at every position) and, with ``shapes``, the same leaf shapes."""
    if _is_node(want):
        return _is_node(got) and set(map(str, got)) == set(map(str, want)) and all(
            _same_keys(got[k] if k in got else got[int(k)], want[k], shapes) for k in want)
    return not _is_node(got) and (not shapes or _shape(got) == _shape(want))


def _flat(tree: Any, where: tuple[str, ...] = ()) -> dict[str, Any]:
    if not _is_node(tree):
        return {_join(where): tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, where + (str(k),)))
    return out


class _Source:
    """One opened checkpoint: its tree (arrays, or metadata leaves with shape/dtype) and a reader."""

    def __init__(self, path: str, form: str, tree: Any, read: Callable[[tuple[str, ...], Any], Any] | None = None,
                 note: str = ""):
        self.path, self.form, self.tree, self.note = path, form, tree, note
        self._read = read

    @property
    def what(self) -> str:
        return f"checkpoint {self.path!r} ({_FORM_WORDS[self.form]}{self.note})"

    def read(self, key: tuple[str, ...], subtree: Any) -> Any:
        """The arrays of ``subtree`` (found at ``key``), read from disk when the tree holds metadata."""
        return subtree if self._read is None else self._read(key, subtree)


def _open_msgpack(path: str) -> _Source:
    raw = read_bytes(path)
    src = _Source(path, "msgpack", None)
    if not raw:
        raise CheckpointError(f"{src.what} is empty; expected flax.serialization msgpack of params, "
                              "{'params': …} or a TrainState")
    try:
        src.tree = serialization.msgpack_restore(raw)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a corrupt file
        raise CheckpointError(f"{src.what} is not a valid msgpack params file (truncated or corrupt? "
                              f"{type(e).__name__}: {e}); expected flax.serialization msgpack of params, "
                              "{'params': …} or a TrainState") from None
    return src


def _unflatten_names(path: str, names: list[str]) -> tuple[str, dict[str, tuple[str, ...]]]:
    sep = "/" if any("/" in n for n in names) else "."
    return sep, {n: tuple(n.split(sep)) for n in names}


def _safetensors_dtype(name: str) -> np.dtype:
    """A safetensors dtype name as numpy (ml_dtypes for bfloat16 and float8, which safetensors.numpy lacks)."""
    import ml_dtypes

    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
             "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64}
    if name not in table:
        raise ValueError(f"tensor dtype {name!r} is not supported")
    return np.dtype(table[name]).newbyteorder("<")


def _open_safetensors(path: str) -> _Source:
    from safetensors import deserialize

    src = _Source(path, "safetensors", None)
    raw = read_bytes(path)
    try:
        flat = {name: np.frombuffer(t["data"], _safetensors_dtype(t["dtype"])).reshape(t["shape"])
                for name, t in deserialize(raw)}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{src.what} is not a valid safetensors file ({type(e).__name__}: {e}); expected "
                              "tensors named by the params' key paths, e.g. 'Dense_0/kernel'") from None
    sep, split = _unflatten_names(path, sorted(flat))
    tree: dict = {}
    for name, parts in split.items():
        node = tree
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not _is_node(node):
                raise CheckpointError(f"{src.what}: tensor {name!r} sits under {sep.join(parts[:i + 1])!r}, "
                                      "which is itself a tensor; names must form a tree")
        if parts[-1] in node:
            raise CheckpointError(f"{src.what}: tensor {name!r} is also a prefix of other tensor names")
        node[parts[-1]] = np.asarray(flat[name])
    src.tree, src.note = tree, f", names split on {sep!r}"
    return src


def _orbax_tree(path: str, note: str = "") -> tuple[Any, dict[tuple[str, ...], str], str]:
    """The metadata tree of an orbax checkpoint (a pytree item, a manager root or a step of items) and,
    per tree prefix, the item directory that holds it."""
    import orbax.checkpoint as ocp
    from etils import epath

    root = epath.Path(path if _remote(path) else os.path.abspath(path))  # orbax wants absolute paths
    if (root / "_METADATA").exists() or (root / "manifest.ocdbt").exists():
        # the item's own tree metadata: the handler reads only the item, while StandardCheckpointer.metadata
        # would also read a step's _CHECKPOINT_METADATA, absent from the item folders of a CheckpointManager
        # step, and log "Metadata file does not exist" for every checkpoint a command loads
        tree = getattr(ocp.StandardCheckpointHandler().metadata(root), "tree", None)
        if tree is None:
            raise CheckpointError(f"checkpoint {path!r} ({_FORM_WORDS['orbax']}{note}) has no readable tree "
                                  "metadata; expected a pytree saved by StandardCheckpointer/PyTreeCheckpointer")
        return dict(tree) if _is_node(tree) else tree, {(): str(root)}, note
    subdirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    steps = [p for p in subdirs if p.name.isdigit()]
    if steps:
        latest = max(steps, key=lambda p: int(p.name))
        return _orbax_tree(str(latest), f"{note}, step {latest.name} of steps {[int(p.name) for p in steps][-5:]}")
    items = [p for p in subdirs if (p / "_METADATA").exists() or (p / "manifest.ocdbt").exists()]
    if not items:
        raise CheckpointError(f"checkpoint {path!r} (a directory) is not an orbax checkpoint: no _METADATA, no "
                              f"numbered step folders, no item folders (has {sorted(p.name for p in root.iterdir())}); "
                              "expected a folder written by orbax.checkpoint (StandardCheckpointer.save or a "
                              "CheckpointManager)")
    if len(items) == 1 and items[0].name == "default":
        tree, dirs, note = _orbax_tree(str(items[0]), note)
        return tree, dirs, note
    tree, dirs = {}, {}
    for item in items:
        sub, _, _ = _orbax_tree(str(item))
        tree[item.name] = sub
        dirs[(item.name,)] = str(item)
    return tree, dirs, f"{note}, items {sorted(tree)}"


def _open_orbax(path: str) -> _Source:
    try:
        tree, dirs, note = _orbax_tree(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax's own errors, wrapped with the file
        raise CheckpointError(f"checkpoint {path!r} ({_FORM_WORDS['orbax']}) cannot be read "
                              f"({type(e).__name__}: {e}); expected a folder written by orbax.checkpoint") from None

    def read(key: tuple[str, ...], subtree: Any) -> Any:
        import orbax.checkpoint as ocp

        prefix = max((p for p in dirs if key[:len(p)] == p), key=len)
        rest = key[len(prefix):]
        target: Any = jax.tree.map(lambda m: jax.ShapeDtypeStruct(_shape(m), _dtype(m)), subtree)
        for k in reversed(rest):
            target = {k: target}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            out = ocp.PyTreeCheckpointer().restore(
                dirs[prefix], args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path!r} ({_FORM_WORDS['orbax']}{note}): reading "
                                  f"{_join(key) or 'the top level'!r} failed ({type(e).__name__}: {e})") from None
        for k in rest:
            out = out[k]
        return out

    return _Source(path, "orbax", tree, read, note)


def open_checkpoint(path: str, *, form: str | None = None) -> _Source:
    """Open ``path`` as ``form`` (default: ``detect_form``)."""
    form = form or detect_form(path)
    if form not in FORMS:
        raise CheckpointError(f"checkpoint {path!r}: unknown form {form!r}; expected one of {FORMS}")
    if form == "orbax" and not _is_dir(path):
        raise CheckpointError(f"checkpoint {path!r} is not a directory; an orbax checkpoint is a folder")
    return {"orbax": _open_orbax, "safetensors": _open_safetensors, "msgpack": _open_msgpack}[form](path)


# ---- selecting and checking the params subtree ---------------------------------------------------
def _descend(src: _Source, key: tuple[str, ...]) -> Any:
    node = src.tree
    for i, k in enumerate(key):
        if not _is_node(node) or k not in node and not (k.isdigit() and int(k) in node):
            at = repr(_join(key[:i])) if i else "the top level"
            has = _show_keys(node) if _is_node(node) else f"an array of shape {_shape(node)}"
            raise CheckpointError(f"{src.what}: key path {_join(key)!r} not found: {at} has {has}; pass the "
                                  "key path of the params subtree (e.g. 'params' or 'state/params'), or none to "
                                  "find it automatically")
        node = node[k] if k in node else node[int(k)]
    return node


def _find_params(src: _Source, want: Any) -> tuple[tuple[str, ...], Any]:
    """The params subtree: the shallowest subtree with the spec's keys and shapes, else the one with its
    keys only (so that the shape error is shown); a tie goes to a subtree named 'params'. When neither is
    unique, the subtree named 'params' or the top level (whose mismatch is then reported)."""
    nodes: list[tuple[tuple[str, ...], Any]] = []
    level: list[tuple[tuple[str, ...], Any]] = [((), src.tree)]
    while level:  # breadth first: shallowest first
        nodes += level
        level = [(k + (str(c),), v) for k, n in level if _is_node(n) for c, v in n.items() if _is_node(v)]
    for shapes in (True, False):
        hits = [(k, n) for k, n in nodes if _same_keys(n, want, shapes)]
        hits = [h for h in hits if len(h[0]) == len(hits[0][0])] if hits else []
        if len(hits) > 1:
            hits = [h for h in hits if h[0][-1:] == ("params",)] or hits
        if len(hits) == 1:
            return hits[0]
        if hits and shapes:
            raise CheckpointError(f"{src.what}: several subtrees have the spec's parameters "
                                  f"({[_join(k) for k, _ in hits]}); pass the key path of the params")
    return next(((k, n) for k, n in nodes if k[-1:] == ("params",)), ((), src.tree))


def _check_structure(src: _Source, spec_name: str, want: Any, got: Any, where: tuple[str, ...]) -> None:
    """Keys at every level, then shapes and dtypes of every leaf (from metadata for orbax)."""
    at = repr(_join(where)) if where else "the top level"
    hint = f"is it a checkpoint of another model? The spec {spec_name!r} expects"
    if _is_node(want):
        if not _is_node(got):
            raise CheckpointError(f"{src.what}: {at} holds an array of shape {_shape(got)}, expected a map of "
                                  f"parameters with keys {_show_keys(want)}")
        gkeys = {str(k): k for k in got}
        missing = [_join(where + (str(k),)) for k in want if str(k) not in gkeys]
        extra = [_join(where + (k,)) for k in gkeys if k not in {str(w) for w in want}]
        if missing or extra:
            raise CheckpointError(f"{src.what}: {at} has keys {_show_keys(got)}: missing leaf/subtree "
                                  f"{missing[:_MAX_KEYS_SHOWN]}, unexpected {extra[:_MAX_KEYS_SHOWN]}; {hint} "
                                  f"{_show_keys(want)}")
        for k in want:
            _check_structure(src, spec_name, want[k], got[gkeys[str(k)]], where + (str(k),))
        return
    name = _join(where) or "the top level"
    if _is_node(got) or not (hasattr(got, "shape") or isinstance(got, (int, float, bool, np.generic))):
        raise CheckpointError(f"{src.what}: parameter {name!r} holds a {type(got).__name__}, expected an array "
                              f"of shape {_shape(want)}; {hint} an array there")
    if _shape(got) != _shape(want):
        raise CheckpointError(f"{src.what}: parameter {_leaf(name)} has shape {_shape(got)}, the spec {spec_name!r} "
                              f"expects {_shape(want)}")
    _check_dtype(src, spec_name, name, _dtype(got), _dtype(want))


def _check_dtype(src: _Source, spec_name: str, name: str, got: np.dtype, want: np.dtype) -> None:
    """A cast that keeps the kind of number (ints/floats to float, ints to int; never complex or
    str/object to real)."""
    def kind(dt):
        if jnp.issubdtype(dt, jnp.complexfloating):
            return "c"
        if jnp.issubdtype(dt, jnp.floating):
            return "f"
        if jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(dt, jnp.bool_):
            return "i"
        return "other"

    ok = {"f": "if", "c": "ifc", "i": "i"}.get(kind(want), "")
    if kind(got) not in ok and got != want:
        raise CheckpointError(f"{src.what}: parameter {_leaf(name)} has dtype {got}, the spec {spec_name!r} "
                              f"expects {want}")


def load_checkpoint(path: str, template: Params, *, params_key: str | None = None, form: str | None = None,
                    spec_name: str = "?") -> Params:
    """Read the params shaped like ``template`` (a pytree of arrays or ``ShapeDtypeStruct``) from ``path``.

    ``path`` may end in ``#key/path`` (the same as ``params_key``). The result has ``template``'s
    structure, shapes and dtypes (lossless-kind casts), with every float finite; anything else raises
    ``CheckpointError`` naming the file, the form and the leaf; a missing file is ``FileNotFoundError``."""
    path, key_from_path = split_params_key(path)
    params_key = params_key if params_key is not None else key_from_path
    src = open_checkpoint(path, form=form)
    want = serialization.to_state_dict(template)
    if params_key:
        key = tuple(k for k in params_key.strip("/").split("/") if k)
        got = _descend(src, key)
    else:
        key, got = _find_params(src, want)
    if key:
        src.note += f", params at {_join(key)!r}"
    _check_structure(src, spec_name, want, got, ())
    arrays = src.read(key, got)
    flat_want, flat_got = _flat(want), _flat(arrays)
    state: dict[str, np.ndarray] = {}
    for name, w in flat_want.items():
        arr = np.asarray(flat_got[name])
        _check_dtype(src, spec_name, name, arr.dtype, _dtype(w))
        arr = arr.astype(_dtype(w))
        if jnp.issubdtype(arr.dtype, jnp.inexact):
            finite = np.isfinite(arr.astype(np.float32) if arr.dtype.itemsize < 4 else arr)
            if not finite.all():
                raise CheckpointError(f"{src.what}: parameter {_leaf(name)} has {int(finite.size - finite.sum())} "
                                      f"non-finite value(s) (NaN/inf) of {arr.size}; the checkpoint is unusable "
                                      "(diverged training?)")
        state[name] = arr
    nested = _nest(want, state, ())
    zeros = jax.tree.map(lambda s: np.zeros(_shape(s), _dtype(s)), template)
    try:
        return serialization.from_state_dict(zeros, nested)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{src.what} does not restore into the parameters of spec {spec_name!r} "
                              f"({type(e).__name__}: {e})") from None


def _nest(want: Any, flat: dict[str, np.ndarray], where: tuple[str, ...]) -> Any:
    if not _is_node(want):
        return flat[_join(where)]
    return {k: _nest(v, flat, where + (str(k),)) for k, v in want.items()}


# ---- writing -------------------------------------------------------------------------------------
def save_checkpoint(path: str, params: Params, *, form: str | None = None) -> str:
    """Write ``params`` (their flax state dict) as ``form`` and return the form. Default form from the
    path: ``.safetensors`` → safetensors (names joined by ``/``); a trailing ``/``, an ``.orbax``
    suffix or an existing directory → orbax (``StandardCheckpointer``, overwriting); else msgpack."""
    state = jax.device_get(serialization.to_state_dict(params))
    if form is None:
        if path.lower().endswith(".safetensors"):
            form = "safetensors"
        elif path.endswith(("/", os.sep)) or path.lower().endswith(".orbax") or _is_dir(path):
            form = "orbax"
        else:
            form = "msgpack"
    if form == "msgpack":
        write_bytes(path, serialization.msgpack_serialize(state))
    elif form == "safetensors":
        from safetensors.numpy import save as st_save

        write_bytes(path, st_save({k: np.ascontiguousarray(v) for k, v in _flat(state).items()}))
    elif form == "orbax":
        import orbax.checkpoint as ocp

        target = path if _remote(path) else os.path.abspath(path)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(target, state, force=True)
            ckptr.wait_until_finished()
    else:
        raise CheckpointError(f"cannot write checkpoint {path!r}: unknown form {form!r}; expected one of {FORMS}")
    return form


__all__ = ["FORMS", "CheckpointError", "checkpoint_state", "detect_form", "load_checkpoint", "open_checkpoint",
           "save_checkpoint", "split_params_key"]
