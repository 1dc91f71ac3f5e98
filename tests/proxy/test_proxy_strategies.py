"""The dispatch strategies, as pure functions over node load numbers."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from app.proxy.strategies import (
    Strategy,
    choose,
    effective_speeds,
    min_expected_latency,
    min_observed_latency,
    random_by_speed,
)


@dataclass
class Load:
    speed: float | None = None
    unfinished: int = 0
    latency: list[float] = field(default_factory=list)


def picks(fn, nodes, n=4000, seed=0) -> Counter[int]:
    rng = random.Random(seed)
    return Counter(fn(nodes, rng) for _ in range(n))


def test_missing_speeds_count_as_the_average_of_the_others():
    assert effective_speeds([Load(10), Load(None), Load(30)]) == [10, 20, 30]
    assert effective_speeds([Load(None), Load(None)]) == [1.0, 1.0]
    assert effective_speeds([Load(0), Load(4)]) == [4, 4]


def test_random_is_weighted_by_speed():
    counts = picks(random_by_speed, [Load(1), Load(3)])
    assert 0.7 < counts[1] / 4000 < 0.8


def test_random_without_speeds_is_uniform():
    counts = picks(random_by_speed, [Load(), Load(), Load()])
    assert all(1100 < counts[i] < 1600 for i in range(3))


def test_min_expected_latency_weighs_queue_against_speed():
    # (unfinished + 1) / speed: 3/1, 5/8, 1/1 -> the fast node with a queue wins.
    nodes = [Load(1, unfinished=2), Load(8, unfinished=4), Load(1, unfinished=0)]
    assert min_expected_latency(nodes, random.Random(0)) == 1
    # A node that stated no speed counts as the average (2): costs 1/2, 4/1, 3/3.
    nodes = [Load(None, unfinished=0), Load(1, unfinished=3), Load(3, unfinished=2)]
    assert min_expected_latency(nodes, random.Random(0)) == 0


def test_min_expected_latency_breaks_ties_at_random():
    counts = picks(min_expected_latency, [Load(), Load()], n=400)
    assert counts[0] > 100 and counts[1] > 100


def test_min_observed_latency_prefers_the_fastest_recent_history():
    nodes = [Load(latency=[1.0, 3.0]), Load(latency=[1.5, 1.5]), Load(latency=[4.0])]
    assert min_observed_latency(nodes, random.Random(0)) == 1


def test_min_observed_latency_tries_untried_nodes_first():
    nodes = [Load(latency=[0.01]), Load(latency=[])]
    assert min_observed_latency(nodes, random.Random(0)) == 1


def test_min_observed_latency_sends_an_untried_node_one_request_at_a_time():
    # Its first request has not finished: a node that never answers must not take the rest.
    nodes = [Load(latency=[0.5]), Load(latency=[], unfinished=1)]
    assert picks(min_observed_latency, nodes, n=100) == {0: 100}
    busy = [Load(unfinished=1), Load(unfinished=3)]
    assert set(picks(min_observed_latency, busy, n=100)) == {0, 1}


def test_huge_or_tiny_speeds_keep_the_arithmetic_finite():
    huge = [Load(1e308), Load(1e308), Load(None)]
    assert all(math.isfinite(s) for s in effective_speeds(huge))
    assert set(picks(random_by_speed, huge, n=300)) == {0, 1, 2}
    tiny = [Load(5e-324, unfinished=1), Load(5e-324), Load(float("nan"))]
    assert min_expected_latency(tiny, random.Random(0)) in (1, 2)


def test_choose_takes_a_strategy_by_its_name():
    nodes = [Load(latency=[0.1]), Load(latency=[9.0])]
    counts = Counter(choose("random", nodes, random.Random(i)) for i in range(200))
    assert counts[1] > 50


@pytest.mark.parametrize("strategy", list(Strategy))
def test_choose_dispatches_and_refuses_an_empty_list(strategy):
    assert choose(strategy, [Load(1)], random.Random(0)) == 0
    with pytest.raises(ValueError):
        choose(strategy, [], random.Random(0))


def test_strategy_names_match_lmdeploy():
    assert {s.value for s in Strategy} == {
        "random",
        "min_expected_latency",
        "min_observed_latency",
    }
