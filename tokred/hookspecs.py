"""The hooks a tokred plugin may implement.

Each ``register_*`` hook receives a ``register`` callback owned by tokred::

    register(name, factory, *, options=None, description=None)

``factory(options)`` builds the part from its validated options (an instance of ``options``, a pydantic model
with ``extra="forbid"``). When ``options`` is omitted, ``factory.Options`` is used if it exists, else a model
without fields; when ``description`` is omitted, the first line of the factory's docstring is used.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "tokred"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_selectors(register):  # type: ignore[no-untyped-def]
    """Register selectors: parts that pick the destination tokens of each group."""


@hookspec
def register_merge_ops(register):  # type: ignore[no-untyped-def]
    """Register merge ops: parts that turn sources and destinations into merge and unmerge maps."""


@hookspec
def register_localities(register):  # type: ignore[no-untyped-def]
    """Register localities: parts that partition a site's token grid into groups."""


@hookspec
def register_schedules(register):  # type: ignore[no-untyped-def]
    """Register schedules: parts that decide when a site merges and when its plan is rebuilt."""


@hookspec
def register_adapters(register):  # type: ignore[no-untyped-def]
    """Register adapters: parts that find the sites of a model and hook into them."""


@hookspec(firstresult=True)
def resolve_adapter(model: Any) -> str | None:
    """Return the name of the registered adapter that handles ``model``, or ``None`` to pass.

    The first plugin to return a name wins.
    """
