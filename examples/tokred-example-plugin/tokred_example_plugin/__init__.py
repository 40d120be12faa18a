"""An example tokred plugin: a ``checkerboard`` selector.

It is installed as its own distribution and found through the ``tokred`` entry-point group::

    [project.entry-points.tokred]
    example = "tokred_example_plugin"
"""

from __future__ import annotations

from pydantic import Field

import tokred
from tokred.registry import Options


class CheckerboardSelector:
    """Destinations on the squares of one colour of a checkerboard, then the other colour."""

    class Options(Options):
        phase: int = Field(0, ge=0, le=1, description="0: squares where row+column is even come first; 1: odd")

    def __init__(self, options: CheckerboardSelector.Options) -> None:
        self.phase = options.phase

    def select(self, ctx):  # type: ignore[no-untyped-def]
        from tokred.strategies.base import select_by_priority

        rows, cols = ctx.layout.coords.unbind(-1)
        priority = (rows + cols + self.phase) % 2
        return select_by_priority(ctx, priority)


@tokred.hookimpl
def register_selectors(register):  # type: ignore[no-untyped-def]
    register("checkerboard", CheckerboardSelector)
