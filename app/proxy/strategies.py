"""How the proxy picks a node: LMDeploy's three dispatch strategies as pure functions.

Each strategy looks only at per-node load numbers (throughput, unfinished requests, recent
latencies) and returns the index of the chosen candidate; ties are broken at random so that
idle nodes share a burst of requests instead of the first one taking it all.
"""

from __future__ import annotations

import math
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


# Bounds on a stated throughput, so that sums, means and quotients of speeds stay finite.
MIN_SPEED = 1e-6
MAX_SPEED = 1e9


def effective_speeds(nodes: Sequence[NodeLoad]) -> list[float]:
    """Each node's throughput; a node that did not state one counts as the average of the rest."""
    stated = [_bounded(n.speed) for n in nodes]
    known = [s for s in stated if s is not None]
    default = fmean(known) if known else 1.0
    return [default if s is None else s for s in stated]


def random_by_speed(nodes: Sequence[NodeLoad], rng: random.Random) -> int:
    """A random node, each weighted by its throughput."""
    return rng.choices(range(len(nodes)), weights=effective_speeds(nodes))[0]


def min_expected_latency(nodes: Sequence[NodeLoad], rng: random.Random) -> int:
    """The node expected to finish this request first: its queue plus this one, over its speed."""
    speeds = effective_speeds(nodes)
    return _argmin([(n.unfinished + 1) / s for n, s in zip(nodes, speeds, strict=True)], rng)


def min_observed_latency(nodes: Sequence[NodeLoad], rng: random.Random) -> int:
    """The node whose recent requests took the least time on average.

    A node with no finished request yet counts as the fastest while it is idle, so that new
    nodes get tried, but as the slowest while its first requests run: a node that never
    answers takes one request at a time, not all of them.
    """
    return _argmin([_observed_cost(n) for n in nodes], rng)


def choose(strategy: Strategy, nodes: Sequence[NodeLoad], rng: random.Random) -> int:
    """The index of the node `strategy` picks among `nodes` (which must not be empty)."""
    if not nodes:
        raise ValueError("no node to choose from")
    # `==`, not `is`: a plain string such as "random" names the same strategy.
    if strategy == Strategy.RANDOM:
        return random_by_speed(nodes, rng)
    if strategy == Strategy.MIN_EXPECTED_LATENCY:
        return min_expected_latency(nodes, rng)
    return min_observed_latency(nodes, rng)


def _observed_cost(node: NodeLoad) -> float:
    if node.latency:
        return fmean(node.latency)
    return math.inf if node.unfinished else 0.0


def _bounded(speed: float | None) -> float | None:
    """`speed` within [MIN_SPEED, MAX_SPEED]; None when it is missing, not positive or NaN."""
    if speed is None or not speed > 0:
        return None
    return min(max(speed, MIN_SPEED), MAX_SPEED)


def _argmin(costs: Sequence[float], rng: random.Random) -> int:
    lowest = min(costs)
    return rng.choice([i for i, c in enumerate(costs) if c == lowest])
