"""Exceptions raised by tokred.

Every error meant for a person derives from :class:`TokredError`; the CLI prints its message without a
traceback and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class TokredError(Exception):
    """Base class of errors whose message is written for the user."""


class PluginError(TokredError):
    """A plugin could not be loaded or registered."""


class DuplicatePartError(PluginError):
    """Two plugins registered a part of the same kind under the same name."""

    def __init__(self, kind: str, name: str, first: str, second: str) -> None:
        self.kind, self.name, self.first, self.second = kind, name, first, second
        super().__init__(f"{kind} {name!r} is registered twice: by plugin {first!r} and by plugin {second!r}")


def _suggestion(name: str, available: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(available), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class UnknownPartError(TokredError, KeyError):
    """A part name that no plugin registered."""

    def __init__(self, kind: str, name: str, available: Sequence[str]) -> None:
        self.kind, self.name, self.available = kind, name, sorted(available)
        listed = ", ".join(self.available) if self.available else f"none (no {kind} is registered)"
        super().__init__(f"unknown {kind} {name!r}{_suggestion(name, self.available)}; available: {listed}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem found in a config: where (dotted path), what was given, what is wrong or allowed."""

    path: str
    message: str
    given: object = None
    has_given: bool = False

    def __str__(self) -> str:
        where = self.path or "<config>"
        given = f" (given: {self.given!r})" if self.has_given else ""
        return f"{where}: {self.message}{given}"


class ConfigError(TokredError, ValueError):
    """A config that does not validate; holds every :class:`ConfigIssue` found."""

    def __init__(self, issues: Sequence[ConfigIssue], source: str | None = None) -> None:
        self.issues = list(issues)
        self.source = source
        head = f"invalid config{f' {source}' if source else ''}"
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"{head}:\n{lines}")
