"""How the proxy picks a node: LMDeploy's three dispatch strategies as pure functions.

Each strategy looks only at per-node load numbers (throughput, unfinished requests, recent
latencies) and returns the index of the chosen candidate; ties are broken at random so that
idle nodes share a burst of requests instead of the first one taking it all.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import StrEnum
from statistics import fmean
from typing import Protocol


class Strategy(StrEnum):
    """The dispatch strategies, named as LMDeploy's `--strategy` names them."""

    RANDOM = "random"
    MIN_EXPECTED_LATENCY = "min_expected_latency"
    MIN_OBSERVED_LATENCY = "min_observed_latency"


class NodeLoad(Protocol):
    """What a strategy needs to know about a node."""

    @property
    def speed(self) -> float | None: ...

    @property
    def unfinished(self) -> int: ...

    @property
    def latency(self) -> Sequence[float]: ...


def effective_speeds(nodes: Sequence[NodeLoad]) -> list[float]:
    """Each node's throughput; a node that did not state one counts as the average of the rest."""
    known = [n.speed for n in nodes if n.speed is not None and n.speed > 0]
    default = fmean(known) if known else 1.0
    return [n.speed if n.speed is not None and n.speed > 0 else default for n in nodes]


def random_by_speed(nodes: Sequence[NodeLoad], rng: random.Random) -> int:
    """A random node, each weighted by its throughput."""
    return rng.choices(range(len(nodes)), weights=effective_speeds(nodes))[0]


def min_expected_latency(nodes: Sequence[NodeLoad], rng: random.Random) -> int:
    """The node expected to finish this request first: its queue plus this one, over its speed."""
    speeds = effective_speeds(nodes)
    return _argmin([(n.unfinished + 1) / s for n, s in zip(nodes, speeds, strict=True)], rng)


def min_observed_latency(nodes: Sequence[NodeLoad], rng: random.Random) -> int:
    """The node whose recent requests took the least time on average.

    A node with no finished request yet counts as the fastest, so new nodes get tried.
    """
    return _argmin([fmean(n.latency) if n.latency else 0.0 for n in nodes], rng)


def choose(strategy: Strategy, nodes: Sequence[NodeLoad], rng: random.Random) -> int:
    """The index of the node `strategy` picks among `nodes` (which must not be empty)."""
    if not nodes:
        raise ValueError("no node to choose from")
    if strategy is Strategy.RANDOM:
        return random_by_speed(nodes, rng)
    if strategy is Strategy.MIN_EXPECTED_LATENCY:
        return min_expected_latency(nodes, rng)
    return min_observed_latency(nodes, rng)


def _argmin(costs: Sequence[float], rng: random.Random) -> int:
    lowest = min(costs)
    return rng.choice([i for i, c in enumerate(costs) if c == lowest])
