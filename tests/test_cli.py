"""The command line: one spelling and one name per concept, generated from the options dataclasses."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import pytest

from beam_influence import options as O
from beam_influence.cli import build_parser, flags, main
from beam_influence.options import Options

FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][A-Za-z0-9_-]*")


def _help(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return out.getvalue()


def _all_option_classes() -> list[type]:
    seen, todo = [], [Options]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return seen


def _subcommands() -> list[str]:
    _, table = build_parser()
    return list(table)


def test_every_help_page_uses_one_spelling_and_shows_defaults():
    """Walks every subcommand's --help (and the demo's): flags are --snake_case, the usage names the
    subcommand, every optional value flag states its default."""
    from pipelines import demo

    pages = {name: _help([name, "--help"]) for name in _subcommands()}
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    pages["demo"] = out.getvalue()
    assert len(pages) >= 11
    for name, text in pages.items():
        if name != "demo":
            assert text.startswith(f"usage: beam-influence {name} "), text[:80]
        own = {f for f in FLAG.findall(text.split("\noptions:", 1)[-1].split("\n\n", 1)[0])}
        bad = sorted(f for f in own if "-" in f[2:])
        assert not bad, f"{name}: flags spelled with '-': {bad}"
        for block in re.split(r"\n  (?=--)", text.split("\noptions:", 1)[1])[1:]:
            flag = block.split()[0]
            if flag in ("-h", "--help") or flag.startswith("--no_") or "(required)" in block:
                continue
            takes_value = len(block.split("\n")[0].split()) > 1 and block.split()[1].isupper()
            if takes_value:
                assert "default" in " ".join(block.split()), f"{name} {flag}: no default shown"


def test_one_name_per_concept_declared_once():
    """Every option field is declared in exactly one options class, and no two flags share a help text
    (the same concept under two names)."""
    declared: dict[str, list[str]] = {}
    helps: dict[str, str] = {}
    for cls in _all_option_classes():
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata or f.name not in vars(cls).get("__annotations__", {}):
                continue
            declared.setdefault(f.name, []).append(cls.__name__)
            helps.setdefault(f.metadata["help"], f.name)
            assert helps[f.metadata["help"]] == f.name, f"{f.name} and {helps[f.metadata['help']]}: one concept"
    twice = {k: v for k, v in declared.items() if len(v) > 1}
    assert not twice, f"declared more than once: {twice}"
    # the two k's are two names: the eigensystem's rank and proponents per query
    assert "num_eigenpairs" in declared and "top_k" in declared
    names = {f.name for cls in O.JOB_OPTIONS.values() for f in flags.flag_fields(cls)}
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)


def test_an_old_spelling_is_an_error_that_names_the_new_one(capsys):
    for argv, old, new in [
        (["eigensystem", "--spec", "x:y", "--top-k", "5"], "--top-k", "--num_eigenpairs"),
        (["index", "--train-data", "x"], "--train-data", "--train_data"),
        (["train", "--out", "x"], "--out", "--output"),
        (["query", "--batch_size", "4"], "--batch_size", "--projection_batch_size"),
        (["query", "--tpo_k", "4"], "--tpo_k", "did you mean --top_k"),  # a typo: the closest flag
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert old in err and new in err and len(err.strip().splitlines()) == 1, err


def test_bad_values_are_one_line_errors(capsys):
    assert main(["index", "--spec", "a:b", "--checkpoint", "c", "--eigensystem", "e", "--train_data", "t",
                 "--index_dir", "i", "--projection_batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--projection_batch_size must be ≥ 1, got 0" in err
    assert main(["index", "--spec", "a:b"]) == 2
    assert "missing required option(s) --checkpoint, --eigensystem, --train_data, --index_dir" in \
        capsys.readouterr().err
    assert main(["eigensystem", "--spec", "a:b", "--checkpoint", "c", "--train_data", "t", "--output", "o",
                 "--num_iters", "5", "--num_eigenpairs", "6"]) == 2
    assert "--num_eigenpairs (6) cannot exceed --num_iters (5)" in capsys.readouterr().err


def test_options_round_trip_through_flags():
    opts = O.FusedOptions(spec="m:f", spec_arg=("a=1", "b=[2]"), checkpoint="c", eigensystem="e",
                          train_data="t", test_data="q", output="o", top_k=3, rho=0.5, compilation_cache=False)
    parser = flags.parser_for(O.FusedOptions, prog="x")
    back = flags.from_namespace(O.FusedOptions, parser.parse_args(flags.to_argv(opts)))
    assert back == opts
    assert flags.spec_kwargs(opts.spec_arg) == {"a": 1, "b": [2]}


def test_comma_separated_repeatable_options():
    parser = flags.parser_for(O.DigitsDataOptions, prog="x")
    o = flags.from_namespace(O.DigitsDataOptions, parser.parse_args(["--output", "d", "--formats", "parquet,jsonl",
                                                                     "--formats", "npz"]))
    assert o.formats == ("parquet", "jsonl", "npz")
    with pytest.raises(ValueError, match="--formats must be one of"):
        O.DigitsDataOptions(output="d", formats=("csv",))


def test_audit_config_fields_are_the_job_options():
    """An audit config is read into options whose shared fields are the jobs' declarations."""
    from beam_influence.audit import AuditConfigError, config_from_dict

    cfg = config_from_dict({"audit_root": "/a", "spec": "m:f", "checkpoint": "/c", "eigensystem": "/e",
                            "train_data": ["/d/*"], "spec_arg": {"hidden": 8}, "projection_batch_size": 32})
    assert cfg.spec_arg == ("hidden=8",) and cfg.projection_method == "auto" == O.IndexOptions.projection_method
    for cls in (O.IndexOptions, O.QueryOptions):
        shared = {f.name for f in flags.flag_fields(cls)} & {f.name for f in dataclasses.fields(cfg)}
        assert {"spec", "checkpoint", "top_k", "complement"} & shared
        for name in shared - {"train_data"}:  # the config's train_data is a list of patterns (one per shard set)
            job_field = next(f for f in dataclasses.fields(cls) if f.name == name)
            cfg_field = next(f for f in dataclasses.fields(cfg) if f.name == name)
            assert job_field.metadata == cfg_field.metadata and job_field.default == cfg_field.default, name
    with pytest.raises(AuditConfigError, match="batch_size is now projection_batch_size"):
        config_from_dict({"audit_root": "/a", "spec": "m:f", "checkpoint": "/c", "eigensystem": "/e",
                          "train_data": ["/d/*"], "batch_size": 32})
    with pytest.raises(AuditConfigError, match="top_k must be ≥ 1"):
        config_from_dict({"audit_root": "/a", "spec": "m:f", "checkpoint": "/c", "eigensystem": "/e",
                          "train_data": ["/d/*"], "top_k": 0})


def test_compilation_cache_directory(tmp_path, monkeypatch):
    from beam_influence.cli import runtime

    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "env-cache"))
    assert runtime.default_cache_dir() == str(tmp_path / "env-cache")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    got = runtime.apply_compilation_options(O.CompilationOptions(compilation_cache_dir=str(tmp_path / "c")))
    assert got == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    import jax

    assert jax.config.jax_compilation_cache_dir == got
    assert runtime.apply_compilation_options(O.CompilationOptions(compilation_cache=False)) is None
