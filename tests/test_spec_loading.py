"""Code loaded by name (issue 21, class 6): a spec path that names anything but a ModelSpec or a spec factory
function of the user's own module is refused before it is called (``--spec os:system`` runs nothing)."""
from __future__ import annotations

import os
import textwrap

import pytest

from beam_influence.core.model_spec import ModelSpec, load_spec


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "userspec_mod.py").write_text(textwrap.dedent('''
        from os import system  # re-exported: not this module's function
        from beam_influence.models import digits

        SPEC = digits.logreg()

        def make(**kw):
            return digits.logreg(**kw)

        class Maker:
            def __init__(self):
                raise AssertionError("a class must never be instantiated by load_spec")

        class _Callable:
            def __call__(self):
                raise AssertionError("a callable object must never be called by load_spec")

        call_me = _Callable()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userspec_mod"


def test_a_spec_path_naming_another_callable_is_refused_before_the_call(user_module, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    for path, match in [("os:system", "defined in module"), ("subprocess:Popen", "is a class"),
                        ("shutil:rmtree", "standard library or a dependency"), ("numpy:load", "dependency"),
                        ("builtins:exec", "builtin_function_or_method"), (f"{user_module}:system", "defined in module"),
                        (f"{user_module}:Maker", "is a class"), (f"{user_module}:call_me", "_Callable")]:
        with pytest.raises(TypeError, match=match):
            load_spec(path)
    assert calls == []  # os.system (patched) never ran
    monkeypatch.undo()
    with pytest.raises(TypeError, match="is a builtin_function_or_method, not a ModelSpec"):
        load_spec("os:system")


def test_spec_instances_and_factories_of_the_users_module_load(user_module):
    assert isinstance(load_spec(f"{user_module}:SPEC"), ModelSpec)
    assert isinstance(load_spec(f"{user_module}:make", l2=0.01), ModelSpec)
    assert isinstance(load_spec("beam_influence.models.sequence:translation"), ModelSpec)
