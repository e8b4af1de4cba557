"""Command-line flags generated from option dataclasses: every flag of the project is declared once.

An option is a dataclass field made with ``beam_influence.options.option`` (default, help, choices and
bounds in its metadata). From a frozen option dataclass this module builds the ``argparse`` arguments (``--<field name>``, one spelling:
underscores, as Beam's own options), reads a namespace back into the dataclass (whose ``__post_init__``
validates), and writes an instance back as flags (for jobs launched by other jobs). Standard library only.

Rules of the generated flags:
  * ``--name VALUE`` for ``int``/``float``/``str`` fields (``X | None`` fields accept a value or stay None);
  * a ``bool`` field defaulting to False is ``--name``; one defaulting to True is ``--no_name``;
  * a ``tuple[str, ...]`` field is repeatable: ``--name A --name B``;
  * the fields the class lists in ``required`` are required flags; every other help text ends with its
    default.
"""
from __future__ import annotations

import argparse
import difflib
import dataclasses
import json
import typing
from typing import Any, Mapping, Sequence, TypeVar

T = TypeVar("T")
_NO_DEFAULT = dataclasses.MISSING


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags (made with ``option``): the required ones first, then the class's
    own, then those of its bases in the order they are listed."""
    order: list[str] = []
    for klass in cls.__mro__:
        for name in vars(klass).get("__annotations__", {}):
            if name not in order:
                order.append(name)
    required = set(getattr(cls, "required", ()))
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    return sorted(fields, key=lambda f: (f.name not in required, order.index(f.name)))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # each base's annotations in its own module


def _base_type(tp) -> tuple[Any, bool]:
    """(the scalar type, repeated?) of a field's annotation: ``int | None`` → (int, False), ``tuple[str, ...]``
    → (str, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    if origin is tuple:
        return typing.get_args(tp)[0], True
    return tp, False


def _default_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per option field of ``cls`` to ``parser`` (``--help`` shows every default)."""
    hints = _hints(cls)
    required_fields = set(getattr(cls, "required", ()))
    overrides = getattr(cls, "help_overrides", {})
    for f in flag_fields(cls):
        meta = f.metadata
        text = overrides.get(f.name, meta["help"])
        base, repeated = _base_type(hints[f.name])
        if base is bool:
            name = f"--no_{f.name}" if f.default else f"--{f.name}"
            parser.add_argument(name, dest=f.name, action="store_false" if f.default else "store_true",
                                default=f.default, help=text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "metavar": meta["metavar"], "default": None,
                                  "type": str if meta.get("split") else base}
        if meta["choices"] is not None and not meta.get("split"):
            kwargs["choices"] = list(meta["choices"])
        if repeated:
            kwargs["action"] = "append"
        if f.name in required_fields:  # checked by the dataclass, after the unknown-flag check (see check_rest)
            kwargs["help"] = f"{text} (required)"
        elif "(default" in text:  # a job that states its own default (the demo's per-task settings)
            kwargs["help"] = text
        else:
            kwargs["help"] = f"{text} (default: {_default_text(f.default)})"
        parser.add_argument(f"--{f.name}", **kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace, **extra: Any) -> T:
    """The dataclass from a parsed namespace (repeated flags → tuples; flags not given → the field's
    default); ``extra`` fields given directly. Raises the dataclass's ``ValueError`` on a bad value."""
    values = dict(extra)
    for f in flag_fields(cls):
        if f.name in values or getattr(ns, f.name, None) is None:
            continue
        v = getattr(ns, f.name)
        if isinstance(v, list):
            split = f.metadata.get("split")
            v = tuple(x.strip() for item in v for x in (item.split(split) if split else [item]) if x.strip())
        values[f.name] = v
    return cls(**values)


def to_argv(opts: Any) -> list[str]:
    """Flags that reproduce ``opts`` (fields equal to their default are left out)."""
    out: list[str] = []
    for f in flag_fields(type(opts)):
        v = getattr(opts, f.name)
        if f.default is not _NO_DEFAULT and v == f.default:
            continue
        if isinstance(v, bool):
            out.append(f"--no_{f.name}" if f.default else f"--{f.name}")
        elif isinstance(v, tuple):
            out += [f"--{f.name}={x}" for x in v]
        elif v is not None:
            out.append(f"--{f.name}={v}")
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Docstring descriptions kept as written; wide enough for the flag names."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=110)


def parser_for(cls, *, prog: str, description: str | None = None, epilog: str | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` of ``cls``'s flags (or add them to ``parser``)."""
    if parser is None:
        parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                         formatter_class=HelpFormatter, allow_abbrev=False)
    add_arguments(parser, cls)
    return parser


def parse(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str | None = None,
          allow_rest: bool = False, epilog: str | None = None) -> tuple[T, list[str]]:
    """Parse ``argv`` into ``cls``; the flags it does not know are returned (``allow_rest``) or an error."""
    parser = parser_for(cls, prog=prog, description=description, epilog=epilog)
    if allow_rest:
        ns, rest = parser.parse_known_args(list(argv or []))
    else:
        ns, rest = parser.parse_args(list(argv or [])), []
    return from_namespace(cls, ns), rest  # a bad value raises the dataclass's ValueError


def check_rest(cls, rest: Sequence[str], *, beam: bool) -> None:
    """Refuse the arguments a job's parser left over: any of them when the job takes no Beam flags; else a
    positional value or a ``--flag`` that no Beam ``PipelineOptions`` declares (Beam would drop it with a
    log line and run on defaults). The message names the flag meant when it is an old spelling."""
    known = {f.name for f in flag_fields(cls)} | {f"no_{f.name}" for f in flag_fields(cls)}
    beam_known = beam_option_names() if beam else set()
    bad = []
    for arg in rest:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name is None or name.replace("-", "_") not in beam_known:
            bad.append(arg)
    if not bad:
        return
    hints = []
    for arg in bad:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            name = flag[2:].replace("-", "_")
            for new in (name, *RENAMED.get(name, ())):
                if new in known:
                    hints.append(f"{flag} is now --{new}")
                    break
            else:
                close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
                if close:
                    hints.append(f"{flag}: did you mean --{close[0]}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ValueError(f"unknown option(s) {' '.join(bad)}{hint}; see --help")


RENAMED = {"top_k": ("num_eigenpairs",), "out": ("output",),
           "batch_size": ("projection_batch_size", "train_batch_size", "curvature_batch_size"),
           "spec_args": ("spec_arg",), "run-id": ("run_id",), "max_examples": ("sample_size",), "eig_k": ("num_eigenpairs",),
           "eig_batch_size": ("curvature_batch_size",), "compile_cache": ("compilation_cache_dir",),
           "no_progress": ("no_progress_bar",)}
"""Old flag names → the one name now (for the unknown-flag message only; no aliases are accepted)."""


def beam_option_names() -> set[str]:
    """Every flag name (underscores) that Beam's ``PipelineOptions`` subclasses declare."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen = {}
    for sub in PipelineOptions.__subclasses__():
        seen.setdefault(str(sub), sub)
    for sub in seen.values():
        sub._add_argparse_args(parser)  # noqa: SLF001 - Beam's documented extension hook
    names = set()
    for action in parser._actions:  # noqa: SLF001
        for s in action.option_strings:
            if s.startswith("--"):
                names.add(s[2:].replace("-", "_"))
    return names


def spec_kwargs(items: Sequence[str] | Mapping[str, Any] | None) -> dict:
    """Keyword arguments of a spec factory from ``--spec_arg KEY=VALUE`` items (values are JSON when they
    parse, strings otherwise), or from a mapping (an audit config's ``spec_arg`` object)."""
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"--spec_arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


__all__ = ["HelpFormatter", "RENAMED", "add_arguments", "beam_option_names", "check_rest", "flag_fields", "from_namespace", "parse", "parser_for",
           "spec_kwargs", "to_argv"]
