"""Every public function, method and property of jaxweights carries a runnable ``>>>`` example.

The public API is what ``import jaxweights`` exposes without a leading underscore (its classes' own
public methods and properties included) plus the classes in `jaxweights.errors`. ``--doctest-modules``
runs the examples module by module, but it skips the members of classes that set
``__module__ = "jaxweights"`` (doctest takes them for imports), so this file runs those examples itself.
"""

from __future__ import annotations

import doctest
import inspect
import sys
from types import ModuleType
from typing import Any

import pytest

import jaxweights
from jaxweights import errors

# Public objects that cannot sensibly carry an example, each with the reason.
_ALLOWED: dict[str, str] = {
    "jaxweights.Weight.tree_flatten": "the pytree protocol, called by jax.tree_util rather than by users",
    "jaxweights.Weight.tree_unflatten": "the pytree protocol, called by jax.tree_util rather than by users",
}

# Missing examples in files owned by others: the proposed ones are in .scratch/docstring_examples_for_owner.md.
# The owner pastes them in and empties this set; test_pending_entries_still_lack_examples keeps it honest.
_PENDING: set[str] = set()


def _public_objects() -> list[tuple[str, object]]:
    """(qualified name, object) for the public API: functions, classes, methods and properties."""
    tops = [
        (f"jaxweights.{name}", value)
        for name, value in vars(jaxweights).items()
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
    ]
    tops += [(f"jaxweights.errors.{name}", getattr(errors, name)) for name in errors.__all__]
    found: list[tuple[str, object]] = []
    for qualname, value in tops:
        found.append((qualname, value))
        if not inspect.isclass(value):
            continue
        for name, member in vars(value).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property) or inspect.isfunction(member):
                found.append((f"{qualname}.{name}", member))
    return found


def _code_of(obj: object) -> object:
    return obj.fget if isinstance(obj, property) else obj


def _home(obj: object) -> ModuleType:
    """The module whose code defines ``obj`` (a class's ``__module__`` may name the package instead)."""
    code = _code_of(obj)
    if inspect.isclass(code):
        for member in vars(code).values():
            member = getattr(member, "__func__", member)
            if inspect.isfunction(member) and member.__module__.startswith("jaxweights."):
                return sys.modules[member.__module__]
    return sys.modules[getattr(code, "__module__", "jaxweights")]


_API = _public_objects()
_NAMES = {name for name, _ in _API}


def test_lists_name_public_objects() -> None:
    assert not (_ALLOWED.keys() | _PENDING) - _NAMES, "an entry names nothing in the public API"
    assert not _ALLOWED.keys() & _PENDING


@pytest.mark.parametrize(("name", "obj"), _API, ids=[name for name, _ in _API])
def test_has_example(name: str, obj: object) -> None:
    if name in _ALLOWED or name in _PENDING:
        pytest.skip(_ALLOWED.get(name, "pending: the owner pastes the proposed example"))
    assert ">>>" in (inspect.getdoc(obj) or ""), f"{name} has no >>> example in its docstring"


def test_pending_entries_still_lack_examples() -> None:
    """Remove a name from `_PENDING` once its example is in."""
    done = sorted(name for name, obj in _API if name in _PENDING and ">>>" in (inspect.getdoc(obj) or ""))
    assert not done, f"these now have examples; remove them from _PENDING: {done}"


def _uncollected() -> list[tuple[str, object, ModuleType]]:
    """Public objects whose examples ``--doctest-modules`` does not find in their home module."""
    collected: dict[str, set[str]] = {}
    result = []
    for name, obj in _API:
        doc = inspect.getdoc(obj) or ""
        if ">>>" not in doc:
            continue
        home = _home(obj)
        if home.__name__ not in collected:
            tests = doctest.DocTestFinder().find(home)
            collected[home.__name__] = {inspect.cleandoc(t.docstring or "") for t in tests}
        if doc not in collected[home.__name__]:
            result.append((name, obj, home))
    return result


_UNCOLLECTED = _uncollected()


@pytest.mark.parametrize(("name", "obj", "home"), _UNCOLLECTED, ids=[name for name, _, _ in _UNCOLLECTED])
def test_example_runs(name: str, obj: object, home: ModuleType) -> None:
    test = doctest.DocTestParser().get_doctest(
        inspect.getdoc(obj) or "", dict(vars(home)), name, home.__file__, 0
    )
    failures: list[str] = []

    class Collect(doctest.DocTestRunner):
        def report_failure(self, out: Any, test: Any, example: doctest.Example, got: str) -> None:
            failures.append(
                f"{example.source.strip()}\n  expected: {example.want.strip()}\n  got: {got.strip()}"
            )

        def report_unexpected_exception(
            self, out: Any, test: Any, example: doctest.Example, exc_info: Any
        ) -> None:
            failures.append(f"{example.source.strip()}\n  raised: {exc_info[1]!r}")

    Collect(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE).run(test, out=lambda _: None)
    assert not failures, f"{name}: its example fails:\n" + "\n".join(failures)
