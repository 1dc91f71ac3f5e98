"""The engine's garbage-collector policy: what start-up made stays out of the collector's scans,
and full collections come a tenth as often, each scanning every object made since and holding
up the next step (four of 13-25 ms in a 17 s H200 benchmark run, none since)."""

from __future__ import annotations

import gc

# Young-generation collections between two full ones while an engine lives (CPython's default: 10).
FULL_COLLECTION_EVERY = 100


def freeze_startup_heap() -> tuple[int, int, int]:
    """Collect, freeze what survives and defer full collections; returns the thresholds that
    `release_startup_heap` restores."""
    gc.collect()
    gc.freeze()
    previous = gc.get_threshold()
    young, middle, old = previous
    gc.set_threshold(young, middle, max(old, FULL_COLLECTION_EVERY))
    return previous


def release_startup_heap(threshold: tuple[int, int, int]) -> None:
    """Hand the frozen heap back to the collector with its former thresholds."""
    gc.unfreeze()
    gc.set_threshold(*threshold)
