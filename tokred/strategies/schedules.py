"""Schedules: when sites merge, when plans are rebuilt and reused, and which sites share a plan."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal, Union

from pydantic import Field, PositiveInt, field_validator

from tokred.registry import Options
from tokred.strategies.base import SiteInfo

IndexSpec = Union[int, str, list[Union[int, str]]]  # noqa: UP007


class IndexSet:
    """A set of non-negative indices: an int, a range ``"a-b"`` (inclusive), ``"a-"`` (from a on), either with
    a step (``"a-b/s"``, ``"a-/s"``), or a list of those.

    ``"5-18"`` is 5..18, ``"0-/3"`` every third index from 0, ``"10-"`` 10 and after, ``[0, 2, "8-9"]`` a union.
    (Colons are avoided on purpose: YAML 1.1 reads ``5:19`` as the base-60 number 319.)
    """

    def __init__(self, spec: IndexSpec) -> None:
        items: Sequence[int | str] = spec if isinstance(spec, list) else [spec]
        self._ints: set[int] = set()
        self._ranges: list[tuple[int, int | None, int]] = []
        for item in items:
            if isinstance(item, bool):
                raise ValueError(f"not an index: {item!r}")
            if isinstance(item, int):
                if item < 0:
                    raise ValueError(f"indices are non-negative, got {item}")
                self._ints.add(item)
                continue
            text = str(item).replace(" ", "")
            if text.isdigit():
                self._ints.add(int(text))
                continue
            bounds, _, step = text.partition("/")
            start, dash, stop = bounds.partition("-")
            valid = dash and start.isdigit() and (stop == "" or stop.isdigit()) and (step == "" or step.isdigit())
            if not valid or (step and int(step) < 1) or (stop and int(stop) < int(start)):
                raise ValueError(f"not an index or range ('a-b', 'a-', 'a-b/step', 'a-/step'): {item!r}")
            self._ranges.append((int(start), int(stop) if stop else None, int(step) if step else 1))

    def __contains__(self, index: int) -> bool:
        if index in self._ints:
            return True
        return any(
            index >= start and (stop is None or index <= stop) and (index - start) % step == 0
            for start, stop, step in self._ranges
        )


def _check_spec(value: object) -> object:
    if isinstance(value, dict):
        for spec in value.values():
            IndexSet(spec)
    elif value is not None:
        IndexSet(value)  # type: ignore[arg-type]
    return value


class IntervalSchedule:
    """Rebuild plans every k steps and reuse them in between; merge only on chosen steps and blocks."""

    class Options(Options):
        every: PositiveInt = Field(1, description="rebuild a plan every k denoising steps, reuse it in between")
        steps: IndexSpec | None = Field(None, description="steps where merging is on (all when null)")
        blocks: IndexSpec | dict[str, IndexSpec] | None = Field(
            None, description="blocks where merging is on (all when null); a mapping gives one set per block family"
        )
        share: Literal["stage", "site"] = Field(
            "stage", description="stage: sites of one block family at one grid share a plan; site: each its own"
        )

        @field_validator("steps", "blocks")
        @classmethod
        def check_indices(cls, value: object) -> object:
            return _check_spec(value)

    def __init__(self, options: IntervalSchedule.Options) -> None:
        self.every = options.every
        self.steps = IndexSet(options.steps) if options.steps is not None else None
        self.share = options.share
        blocks = options.blocks
        if isinstance(blocks, dict):
            self.blocks: IndexSet | dict[str, IndexSet] | None = {k: IndexSet(v) for k, v in blocks.items()}
        else:
            self.blocks = IndexSet(blocks) if blocks is not None else None

    def merges(self, step: int, site: SiteInfo) -> bool:
        if self.steps is not None and step not in self.steps:
            return False
        if self.blocks is None:
            return True
        if isinstance(self.blocks, dict):
            chosen = self.blocks.get(site.family)
            return chosen is not None and site.block in chosen
        return site.block in self.blocks

    def rebuilds(self, step: int, built_at: int | None) -> bool:
        return built_at is None or step - built_at >= self.every or step < built_at

    def share_key(self, site: SiteInfo, grid: tuple[int, int]) -> Hashable:
        if self.share == "site":
            return ("site", site.name, grid)
        return ("stage", site.family, grid)
