"""The audit's configuration: one frozen, validated dataclass read from a JSON (or YAML) file.

Example ``audit.json`` (relative local paths are relative to the file's directory)::

    {
      "audit_root": "gs://my-bucket/influence-audit",
      "spec": "beam_influence.models.digits:logreg",
      "checkpoint": "gs://my-bucket/model/ckpt.msgpack",
      "eigensystem": "gs://my-bucket/model/eig.safetensors",
      "train_data": ["gs://my-bucket/data/train-*.parquet"],
      "standing_queries": "gs://my-bucket/data/watchlist-*.parquet",
      "top_k": 10,
      "self_influence_top": 100,
      "projection_batch_size": 64,
      "thresholds": {"max_new_suspects": 20, "max_dead_letter_fraction": 0.01},
      "beam_args": ["--runner=DataflowRunner", "--project=my-project", "--region=us-central1"]
    }
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, ClassVar, Mapping

from beam_influence.options import (CompilationOptions, ComplementOptions, DataFormatOptions, ModelOptions,
                                    ProjectionOptions, QueryListOptions, SelfInfluenceOptions_, SketchOptions)


RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class AuditConfigError(ValueError):
    """The audit configuration file is missing, unreadable or invalid; the message says which field."""


class AuditUsageError(ValueError):
    """A bad command-line argument (e.g. a run id that is not a plain folder name)."""


class AuditInputError(FileNotFoundError):
    """A configured input pattern matches no file (the data is gone, or the pattern is wrong)."""


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a plain folder name (``[A-Za-z0-9._-]+``, at most 128 characters, not ``.``
    or ``..``), else ``AuditUsageError``: a run id never names a path outside ``runs/``."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or run_id in (".", ".."):
        raise AuditUsageError(f"invalid run id {run_id!r}: use 1-128 of the characters A-Z a-z 0-9 . _ - "
                              "(a plain folder name, not '.' or '..')")
    return run_id


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Alert thresholds; ``None`` disables one. Crossing any makes the run exit with ``ALERT_EXIT_CODE``.

    max_new_suspects: training ids in this run's self-influence top-N that were not in the previous run's.
      Not evaluated on the first (baseline) run or after a change of eigensystem.
    max_dead_letter_fraction: dead letters / (indexed rows + dead letters) over the shards indexed *in this run*.
    max_changed_queries: standing queries whose top-k proponent or opponent ids changed since the previous run.
    """

    max_new_suspects: int | None = None
    max_dead_letter_fraction: float | None = None
    max_changed_queries: int | None = None

    def __post_init__(self):
        for name in ("max_new_suspects", "max_changed_queries"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise AuditConfigError(f"thresholds.{name} must be an integer ≥ 0 or null, got {v!r}")
        v = self.max_dead_letter_fraction
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
            raise AuditConfigError(f"thresholds.max_dead_letter_fraction must be a number in [0, 1] or null, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditConfig(ModelOptions, DataFormatOptions, ProjectionOptions, QueryListOptions, SelfInfluenceOptions_,
                  ComplementOptions, SketchOptions, CompilationOptions):
    """Everything one recurring audit needs; the fields shared with the jobs have the jobs' option names,
    defaults and checks (``beam_influence.options``: a config field is spelled like the job's flag).

    audit_root: where the audit keeps its state: ``indexes/<eigensystem id>/`` (one index directory per
      input shard + ``audit_manifest.json``), ``runs/<run id>/`` (reports and results), ``state.json``.
    spec, spec_arg, checkpoint, eigensystem: the model and its eigensystem (as for ``beam-influence index``;
      ``spec_arg`` an object of factory arguments or a list of "KEY=VALUE").
    train_data: file patterns of the training shards; every matched file is one *input shard*, indexed once
      per eigensystem (shards are expected to be immutable; a shard whose size/checksum changed is re-indexed).
    standing_queries: file pattern of query records whose top-k proponents/opponents are refreshed every run.
    shards_per_job: input shards indexed by one Beam job (the unit of progress an interrupted run keeps).
    beam_args: runner flags for every job (command-line flags after the config override them).
    """

    required: ClassVar = ("audit_root", "spec", "checkpoint", "eigensystem", "train_data")
    flag_prefix: ClassVar = ""
    audit_root: str | None = None
    train_data: tuple[str, ...] = ()
    standing_queries: str | None = None
    shards_per_job: int = 16
    thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)
    beam_args: tuple[str, ...] = ()

    def __post_init__(self):
        train = (self.train_data,) if isinstance(self.train_data, str) else tuple(self.train_data or ())
        if not all(isinstance(p, str) and p for p in train):
            raise AuditConfigError(f"train_data must be a non-empty list of file patterns, got {self.train_data!r}")
        object.__setattr__(self, "train_data", train)
        spec_arg = self.spec_arg
        if isinstance(spec_arg, Mapping):
            spec_arg = tuple(f"{k}={json.dumps(v)}" for k, v in sorted(spec_arg.items()))
        elif isinstance(spec_arg, str) or not all(isinstance(a, str) and "=" in a for a in spec_arg or ()):
            raise AuditConfigError(f"spec_arg must be an object or a list of 'KEY=VALUE', got {self.spec_arg!r}")
        object.__setattr__(self, "spec_arg", tuple(spec_arg or ()))
        args = (self.beam_args,) if isinstance(self.beam_args, str) else tuple(self.beam_args or ())
        if not all(isinstance(a, str) and a.startswith("--") for a in args):
            raise AuditConfigError(f"beam_args must be a list of '--flag=value' strings, got {self.beam_args!r}")
        object.__setattr__(self, "beam_args", args)
        if isinstance(self.thresholds, Mapping):
            object.__setattr__(self, "thresholds", _from_mapping(Thresholds, self.thresholds, "thresholds."))
        elif not isinstance(self.thresholds, Thresholds):
            raise AuditConfigError(f"thresholds must be an object, got {self.thresholds!r}")
        for name in ("audit_root", "spec", "checkpoint", "eigensystem"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise AuditConfigError(f"{name} must be a non-empty string, got {v!r}")
        if isinstance(self.spec, str) and ":" not in self.spec:
            raise AuditConfigError(f"spec must be an import path 'pkg.module:factory', got {self.spec!r}")
        if self.standing_queries is not None and (not isinstance(self.standing_queries, str) or not self.standing_queries):
            raise AuditConfigError(f"standing_queries must be a file pattern or null, got {self.standing_queries!r}")
        if isinstance(self.shards_per_job, bool) or not isinstance(self.shards_per_job, int) or self.shards_per_job < 1:
            raise AuditConfigError(f"shards_per_job must be an integer ≥ 1, got {self.shards_per_job!r}")
        for f in dataclasses.fields(self):  # integer options must be integers in a config (JSON 1.5, true)
            v = getattr(self, f.name)
            if "help" in f.metadata and isinstance(f.default, int) and not isinstance(f.default, bool) \
                    and v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise AuditConfigError(f"{f.name} must be an integer, got {v!r}")
        try:
            super().__post_init__()
        except ValueError as e:
            raise AuditConfigError(str(e)) from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["train_data"], out["beam_args"], out["spec_arg"] = list(self.train_data), list(self.beam_args), \
            list(self.spec_arg)
        return out


def _from_mapping(cls, raw: Mapping[str, Any], prefix: str = ""):
    if not isinstance(raw, Mapping):
        raise AuditConfigError(f"{prefix or 'the config'} must be an object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        from beam_influence.cli.flags import RENAMED

        hints = [f"{old} is now {new}" for old in unknown for new in RENAMED.get(old, ()) if new in names][:len(unknown)]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise AuditConfigError(f"unknown {prefix or ''}field(s) {unknown}{hint}; known: {sorted(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    required += [n for n in getattr(cls, "required", ()) if n not in required]
    missing = [f"{prefix}{n}" for n in required if n not in raw]
    if missing:
        raise AuditConfigError(f"missing required field(s) {missing}")
    try:
        return cls(**raw)
    except AuditConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. a list where a scalar was expected
        raise AuditConfigError(f"invalid {prefix or 'config'}: {e}") from None


def _is_local_relative(path: str) -> bool:
    return "://" not in path and not os.path.isabs(path)


def config_from_dict(raw: Mapping[str, Any], *, base_dir: str | None = None) -> AuditConfig:
    """Validate ``raw``; relative local paths are resolved against ``base_dir`` when given."""
    raw = dict(raw)
    if base_dir:
        for key in ("audit_root", "checkpoint", "eigensystem", "standing_queries"):
            if isinstance(raw.get(key), str) and _is_local_relative(raw[key]):
                raw[key] = os.path.normpath(os.path.join(base_dir, raw[key]))
        train = raw.get("train_data")
        if isinstance(train, str):
            train = [train]
        if isinstance(train, list):
            raw["train_data"] = [os.path.normpath(os.path.join(base_dir, p)) if isinstance(p, str) and _is_local_relative(p)
                                 else p for p in train]
    return _from_mapping(AuditConfig, raw)


def load_config(path: str) -> AuditConfig:
    """Read an ``AuditConfig`` from a JSON file (or YAML: ``.yaml``/``.yml``, needs PyYAML)."""
    from beam_influence.util import read_text

    try:
        text = read_text(path)
    except Exception as e:  # noqa: BLE001
        raise AuditConfigError(f"cannot read the audit config {path!r}: {e}") from None
    try:
        if path.lower().endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001
        raise AuditConfigError(f"the audit config {path!r} does not parse: {e}") from None
    base = os.path.dirname(os.path.abspath(path)) if "://" not in path else None
    return config_from_dict(raw, base_dir=base)
