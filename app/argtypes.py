"""argparse value types for command-line numbers: a wrong value is a one-line usage error
(`--port: 70000 is above 65535`), not a traceback or a silently clamped setting."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

Number = TypeVar("Number", int, float)


def bounded(
    kind: type[Number], low: Number, high: Number | None = None, *, open_low: bool = False
) -> Callable[[str], Number]:
    """A parser of `kind` values from `low` (excluded with `open_low`) up to `high`, finite."""

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(
                f"{text} is not above {low}" if open_low else f"{text} is below {low}"
            )
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is above {high}")
        return value

    return parse


positive_int = bounded(int, 1)
non_negative_int = bounded(int, 0)
non_negative_float = bounded(float, 0.0)
positive_float = bounded(float, 0.0, open_low=True)
# 0 lets the system pick a free port, as uvicorn does with it.
port = bounded(int, 0, 65535)
