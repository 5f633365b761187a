"""The one way a name becomes a method, task, function or metric.

Every kind has one ``Registry``: a name is looked up among the built-ins, then
in families of prefixed names (``peft:loha``), then as a ``module:attribute``
reference, then among the installed entry points of the kind's group
(``qlsearch.methods``, ``qlsearch.tasks``, ``qlsearch.functions``,
``qlsearch.metrics``). A miss raises one ``ValueError`` that names the field,
lists what is allowed and suggests the closest name.

Decision: a study carries *names*, never objects, and every process resolves
them itself (a Ray worker imports the ``module:attribute`` module, or reads the
entry points, by name). A registration made only in the driver would not be
seen by the workers; see ``plugin_modules`` for how the modules travel to them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from difflib import get_close_matches
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, field: str, what: str) -> T:
    """For a plain table with no plug-ins: ``registry[name]``; a miss raises ``ValueError("field: unknown what 'x'; allowed: ... Did you mean ...?")``."""
    try:
        return registry[name]
    except KeyError:
        raise unknown_name(name, list(registry), field, what) from None


def unknown_name(name: str, allowed: list[str], field: str, what: str, more: str = "") -> ValueError:
    close = get_close_matches(str(name), allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{field}: unknown {what} {name!r}; allowed: {', '.join(sorted(allowed))}{more}.{hint}")


def is_reference(name: str) -> bool:
    """``module:attribute`` (``module`` dotted, ``attribute`` possibly dotted)."""
    module, sep, attribute = str(name).partition(":")
    return bool(sep and module and attribute) and all(p.isidentifier() for p in
                                                      (*module.split("."), *attribute.split(".")))


def import_reference(reference: str, field: str):
    """The object ``module:attribute`` names; one clear error when the module or attribute is missing."""
    module_name, _, attribute = reference.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{field}: cannot import {module_name!r} for {reference!r} ({err}); the module "
                         "must be importable: on PYTHONPATH, in the current folder, or installed") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{field}: module {module_name!r} has no attribute {attribute!r} "
                             f"(in {reference!r})") from None
    return obj


@dataclass(frozen=True)
class Family(Generic[T]):
    """Names ``<prefix>:<member>`` made on demand, e.g. every method PEFT registers."""

    prefix: str
    origin: str
    members: Callable[[], list[str]]
    make: Callable[[str], T]  # raises ValueError for a member it does not know


@dataclass(frozen=True)
class Listed(Generic[T]):
    name: str
    entry: T
    origin: str  # "built-in", a family's ("PEFT"), "entry point (dist version)"


class Registry(Generic[T]):
    """Names of one kind (``what``) → entries of type ``kind``; see the module docstring."""

    def __init__(self, what: str, field: str, group: str, kind: type, builtins: dict[str, T] | None = None,
                 references: bool = True):
        self.what, self.field, self.group, self.kind = what, field, group, kind
        self.references = references  # False: module:attribute is refused (metrics: see metrics.py)
        self.builtins: dict[str, T] = {} if builtins is None else builtins
        self.families: dict[str, Family[T]] = {}
        self._resolved: dict[str, T] = {}  # references and entry points, once loaded

    def add(self, name: str, entry: T) -> T:
        if name in self.builtins:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self.builtins[name] = entry
        return entry

    def add_family(self, family: Family[T]) -> None:
        self.families[family.prefix] = family

    def get(self, name: str) -> T:
        """The entry ``name`` names: a built-in, ``prefix:member``, ``module:attribute`` or an entry point."""
        if name in self.builtins:
            return self.builtins[name]
        if name in self._resolved:
            return self._resolved[name]
        prefix, _, member = str(name).partition(":")
        if member and prefix in self.families:
            entry = self.families[prefix].make(member)
        elif is_reference(name) and self.references:
            entry = self._checked(import_reference(name, self.field), name)
        else:
            points = {ep.name: ep for ep in self._entry_points()}
            if name not in points:
                more = "".join(f", {p}:<name>" for p in self.families)
                more += f", an entry point of {self.group}" + (" or module:attribute" if self.references else "")
                raise unknown_name(name, [*self.builtins, *points], self.field, self.what, more)
            entry = self._load(points[name])
        self._resolved[name] = entry
        return entry

    def listed(self) -> Iterator[Listed[T]]:
        """Every entry that can be named without a reference: built-ins, families, entry points."""
        for name in sorted(self.builtins):
            yield Listed(name, self.builtins[name], "built-in")
        for family in self.families.values():
            for member in family.members():
                yield Listed(f"{family.prefix}:{member}", self.get(f"{family.prefix}:{member}"), family.origin)
        for ep in sorted(self._entry_points(), key=lambda ep: ep.name):
            dist = f" ({ep.dist.name} {ep.dist.version})" if ep.dist else ""
            yield Listed(ep.name, self._load(ep), f"entry point{dist}")

    def _entry_points(self) -> list[metadata.EntryPoint]:
        return [ep for ep in metadata.entry_points(group=self.group) if ep.name not in self.builtins]

    def _load(self, ep: metadata.EntryPoint) -> T:
        try:
            obj = ep.load()
        except Exception as err:  # noqa: BLE001  (an installed plug-in that does not import)
            raise ValueError(f"{self.field}: entry point {ep.name!r} of {self.group} ({ep.value}) "
                             f"does not load: {type(err).__name__}: {err}") from None
        entry = self._checked(obj, ep.name)
        if getattr(entry, "name", ep.name) != ep.name:  # one name for one thing, everywhere
            raise ValueError(f"{self.field}: entry point {ep.name!r} of {self.group} ({ep.value}) holds "
                             f"{entry.name!r}; allowed: an entry point named like the {self.what} it holds")
        return entry

    def _checked(self, obj, name: str) -> T:
        if not isinstance(obj, self.kind):
            raise ValueError(f"{self.field}: {name!r} is a {type(obj).__name__}; allowed: a "
                             f"{self.kind.__module__}.{self.kind.__name__}")
        return obj


def plugin_modules(names: list[str]) -> list:
    """The top-level modules of the ``module:attribute`` references in ``names`` that no installed
    distribution provides: what a Ray cluster must ship to its workers (``runtime_env``'s
    ``py_modules``). Installed plug-ins (entry points included) must be installed on every node."""
    references = [name for name in names if is_reference(name)]
    if not references:  # the common case: packages_distributions() reads every installed package
        return []
    installed = metadata.packages_distributions()
    modules = {}
    for name in references:
        top = name.partition(":")[0].split(".")[0]
        if top not in installed and top not in sys.stdlib_module_names:
            modules[top] = importlib.import_module(top)
    return list(modules.values())
