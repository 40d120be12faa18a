"""tokred's own strategies, registered as a plugin like any other."""

from __future__ import annotations

from tokred.hookspecs import hookimpl
from tokred.strategies.localities import GlobalLocality, StripeLocality, TileLocality
from tokred.strategies.merge_ops import AttentionMerge, MeanMerge, PruneMerge
from tokred.strategies.schedules import IntervalSchedule
from tokred.strategies.selectors import FacilityLocationSelector, GridSelector, RandomSelector


@hookimpl
def register_selectors(register):  # type: ignore[no-untyped-def]
    register("toma", FacilityLocationSelector)
    register("random", RandomSelector)
    register("grid", GridSelector)


@hookimpl
def register_merge_ops(register):  # type: ignore[no-untyped-def]
    register("attention", AttentionMerge)
    register("mean", MeanMerge)
    register("prune", PruneMerge)


@hookimpl
def register_localities(register):  # type: ignore[no-untyped-def]
    register("global", GlobalLocality)
    register("tiles", TileLocality)
    register("stripes", StripeLocality)


@hookimpl
def register_schedules(register):  # type: ignore[no-untyped-def]
    register("interval", IntervalSchedule)
